//! `ublk add` argument parsing: arguments from NUL-separated bytes. Parsing
//! never panics; a configuration it accepts either validates or is refused
//! with an error, and every size it parses is shown back exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let args: Vec<String> = data.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    for a in &args {
        if let Ok(v) = ublk::cli::parse_size(a) {
            let shown = ublk::cli::format_size(v);
            assert_eq!(ublk::cli::parse_size(&shown), Ok(v), "{a} -> {v} -> {shown}");
        }
    }
    if let Ok(mut a) = ublk::cli::parse_add(&args) {
        a.cfg.size = a.size.unwrap_or(1 << 30);
        let _ = a.cfg.validate();
    }
});
