//! Panics turned into messages. A panic is a bug in sewa or in a library it calls. While the
//! pipeline handles one checkpoint, it becomes that checkpoint's quarantine reason and the
//! daemon carries on (`Pipeline::load`); anywhere else the pipeline's state is suspect and the
//! daemon stops with the message (`daemon::contain`). This module only catches and describes.

use std::any::Any;
use std::panic::UnwindSafe;

/// Run `f`; a panic comes back as its message. The default panic hook has already printed the
/// message with its source location to stderr (the log) by the time this returns.
pub fn catch<T>(f: impl FnOnce() -> T + UnwindSafe) -> Result<T, String> {
    std::panic::catch_unwind(f).map_err(|payload| message(payload.as_ref()))
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        return (*s).to_string();
    }
    if let Some(s) = payload.downcast_ref::<String>() {
        return s.clone();
    }
    "(a panic without a message)".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_come_back_as_their_message() {
        assert_eq!(catch(|| 7), Ok(7));
        assert_eq!(
            catch(|| -> u8 { panic!("byte index 4 is not a char boundary") }),
            Err("byte index 4 is not a char boundary".to_string())
        );
        let n = 3;
        assert_eq!(catch(move || -> u8 { panic!("formatted {n}") }), Err("formatted 3".into()));
        let custom = catch(|| -> u8 { std::panic::panic_any(42u32) });
        assert_eq!(custom, Err("(a panic without a message)".into()));
    }
}
