//! The libraries name a setting the way a config file does (`state_key = "net"`): that is how
//! `sewa watch` is configured, and they know no flags. On the command line the same setting
//! is a flag (`--state-key net`): a one-shot command's error is shown in those words.

/// Settings a library message may name, and their flags.
const FLAGS: &[(&str, &str)] = &[
    ("state_key", "--state-key"),
    ("int_policy", "--int-policy"),
    ("dtype_overflow", "--dtype-overflow"),
    ("dtype", "--dtype"),
    ("parents", "--parents"),
    ("deepspeed_weights", "--deepspeed-weights"),
    ("strip_prefix", "--strip-prefix"),
    ("lora", "--lora"),
    ("base", "--base"),
];

/// `msg` with every `KEY = "VALUE"` (or `KEY = true`) of a setting in `FLAGS` written as its
/// flag (`--flag VALUE`, `--flag`). A key qualified by its table (`[watch] state_key = ...`)
/// is about a config file and stays as it is.
pub fn in_flag_words(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    'scan: while !rest.is_empty() {
        for (key, flag) in FLAGS {
            let Some(after) = rest.strip_prefix(key).and_then(|r| r.strip_prefix(" = ")) else {
                continue;
            };
            let qualified = out.ends_with("] ");
            let starts_word = out.chars().last().is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
            if qualified || !starts_word {
                continue;
            }
            if let Some(after) = after.strip_prefix("true") {
                out.push_str(flag);
                rest = after;
                continue 'scan;
            }
            if let Some((value, after)) = quoted(after) {
                let plain = !value.is_empty()
                    && value.chars().all(|c| c.is_ascii_alphanumeric() || "_-.:/".contains(c));
                out.push_str(flag);
                out.push(' ');
                if plain {
                    out.push_str(&value)
                } else {
                    out.push_str(&format!("{value:?}"))
                }
                rest = after;
                continue 'scan;
            }
        }
        let c = rest.chars().next().unwrap_or_default();
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A `"..."` at the start of `s` (as Rust's `{:?}` writes it): its content, unescaped, and
/// what follows.
fn quoted(s: &str) -> Option<(String, &str)> {
    let body = s.strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &body[i + 1..])),
            '\\' => value.push(chars.next()?.1),
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::in_flag_words;

    #[test]
    fn settings_become_flags_and_table_keys_stay() {
        let cases = [
            ("weights: state_key = \"net\"", "weights: --state-key net"),
            (
                "x int_policy = \"error\" (int_policy = \"latest\")",
                "x --int-policy error (--int-policy latest)",
            ),
            ("with dtype_overflow = \"saturate\"", "with --dtype-overflow saturate"),
            ("(dtype = \"f32\", or bf16)", "(--dtype f32, or bf16)"),
            ("or set parents = true to", "or set --parents to"),
            ("key: state_key = \"a b\"", "key: --state-key \"a b\""),
            ("[watch] state_key = \"net\"", "[watch] state_key = \"net\""),
            ("my_dtype = \"f32\"", "my_dtype = \"f32\""),
            ("state_key = unquoted", "state_key = unquoted"),
            ("naïve ünïcode dtype = \"bf16\"", "naïve ünïcode --dtype bf16"),
        ];
        for (msg, want) in cases {
            assert_eq!(in_flag_words(msg), want, "{msg}");
        }
    }
}
