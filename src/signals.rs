//! SIGINT/SIGTERM while serving: a handler that only records the signal, so
//! whichever thread of the process receives it, the serving loop sees it and
//! stops the device cleanly (instead of the default action killing the
//! process with the device left behind). Signals are process-wide, so this
//! state is too.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

static FIRED: AtomicI32 = AtomicI32::new(0);

struct Installed {
    users: usize,
    old: [libc::sigaction; 2],
}

// SAFETY: sigaction structs are plain data.
unsafe impl Send for Installed {}

static STATE: Mutex<Option<Installed>> = Mutex::new(None);
const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

extern "C" fn on_signal(sig: libc::c_int) {
    FIRED.store(sig, Ordering::SeqCst);
}

/// While alive, SIGINT/SIGTERM are recorded instead of killing the process.
pub(crate) struct StopSignals(());

impl StopSignals {
    pub(crate) fn install() -> StopSignals {
        let mut st = STATE.lock();
        match st.as_mut() {
            Some(i) => i.users += 1,
            None => {
                // SAFETY: sigaction with a handler that only stores to an atomic
                // (async-signal-safe); old actions are saved to be restored.
                let old = unsafe {
                    let mut old: [libc::sigaction; 2] = std::mem::zeroed();
                    let mut sa: libc::sigaction = std::mem::zeroed();
                    sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                    libc::sigemptyset(&mut sa.sa_mask);
                    for (i, s) in SIGNALS.iter().enumerate() {
                        libc::sigaction(*s, &sa, &mut old[i]);
                    }
                    old
                };
                FIRED.store(0, Ordering::SeqCst);
                *st = Some(Installed { users: 1, old });
            }
        }
        StopSignals(())
    }

    /// The signal received since installation, if any.
    pub(crate) fn fired(&self) -> Option<i32> {
        Some(FIRED.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        let mut st = STATE.lock();
        if let Some(i) = st.as_mut() {
            i.users -= 1;
            if i.users == 0 {
                // SAFETY: restores the actions saved in `install`.
                unsafe {
                    for (k, s) in SIGNALS.iter().enumerate() {
                        libc::sigaction(*s, &i.old[k], std::ptr::null_mut());
                    }
                }
                *st = None;
            }
        }
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (threads it starts later
/// inherit the mask) and returns the previous mask. A server that blocks them
/// before its device exists keeps a signal that arrives during setup pending
/// until `Device::serve_until_signal` takes it and removes the device, instead
/// of the default action killing the process with the device left behind.
pub fn block_stop_signals() -> libc::sigset_t {
    set_stop_signals_mask(libc::SIG_BLOCK)
}

/// Blocks or unblocks SIGINT and SIGTERM in the calling thread; returns the
/// previous mask.
pub(crate) fn set_stop_signals_mask(how: libc::c_int) -> libc::sigset_t {
    // SAFETY: sigset manipulation on locals; affects only this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(how, &set, &mut old);
        old
    }
}

/// Blocks SIGPIPE in the calling (queue) thread: a lease `send` on a socket
/// whose peer has closed then fails with EPIPE instead of the signal's
/// default action killing the whole server (the zero-copy modes write to the
/// socket, which cannot pass MSG_NOSIGNAL).
pub(crate) fn block_sigpipe() {
    // SAFETY: sigset manipulation on locals; affects only this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
