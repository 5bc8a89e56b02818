//! State files (what `ublk recover` reads): parsing any text never panics,
//! and a configuration read from one is written back and read again the
//! same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ublk::state::StateFile;
use ublk::DeviceConfig;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let s = StateFile::parse(&text);
    assert_eq!(StateFile::parse(&s.render()), s, "render/parse round trip");
    if let Ok(cfg) = DeviceConfig::from_state(&s) {
        let mut again = StateFile::default();
        cfg.to_state(&mut again);
        let back = DeviceConfig::from_state(&again).expect("a config read from a state file is written back readable");
        assert_eq!(format!("{back:?}"), format!("{cfg:?}"));
    }
});
