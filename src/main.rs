fn main() {
    eprintln!("sewa: the command line is being written");
    std::process::exit(1);
}
