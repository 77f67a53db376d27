//! What both binaries do as processes: stop on a signal, and take the file
//! descriptors they are allowed.

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM (what `systemctl stop`
/// and `docker stop` send).
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM, and exits the process
/// (status 130) on the second: a drain that takes too long for the person
/// at the terminal is cut short by pressing Ctrl-C again.
pub fn on_signals(shutdown: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down; signal again to exit at once");
        shutdown.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without waiting");
        restore_terminal();
        std::process::exit(130);
    });
}

/// Raises the soft limit on open files to the hard limit, and returns the
/// limit now in force (`None` where it cannot be read). Every connection
/// is a descriptor (a dial-back two: frps's and the local service's), and
/// systemd's default soft limit of 1,024 is reached by a few hundred
/// requests at once; the hard limit (524,288 under systemd) is what the
/// administrator allows.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the limit into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: setrlimit reads the struct; a soft limit equal to the
            // hard limit is always allowed.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim = raised;
            }
        }
        Some(lim.rlim_cur)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// The settings of a terminal a prompt is changing (echo off for a
/// password), kept so that they can be put back if the process ends before
/// the prompt does.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
static SAVED_TERMINAL: std::sync::Mutex<Option<(std::fs::File, libc::termios)>> =
    std::sync::Mutex::new(None);

/// Keeps a terminal's settings for [`restore_terminal`] until dropped (the
/// prompt ended and put them back itself).
#[derive(Debug)]
#[must_use = "the settings are forgotten when the guard is dropped"]
pub struct SavedTerminal(());

impl Drop for SavedTerminal {
    fn drop(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        SAVED_TERMINAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

/// Saves the settings of the terminal at `path` (`/dev/tty`: the
/// controlling terminal, which a password prompt reads) before a prompt
/// changes them. A process that ends while the prompt waits (a SIGTERM
/// from elsewhere: Ctrl-C typed at the prompt is a character to it, which
/// it handles itself) calls [`restore_terminal`], so the shell it leaves
/// does not go on without echo. Nothing is saved where `path` is no terminal.
pub fn save_terminal(path: &std::path::Path) -> SavedTerminal {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::fd::AsRawFd;
        if let Ok(tty) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            // SAFETY: an all-zero termios is a valid value to be overwritten.
            let mut settings: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: tcgetattr writes into the struct we own, for a
            // descriptor we hold open.
            if unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut settings) } == 0 {
                *SAVED_TERMINAL
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((tty, settings));
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = path;
    SavedTerminal(())
}

/// Puts back the settings [`save_terminal`] saved, if a prompt is still
/// waiting, and ends its line; true when it did. For the moment the
/// process ends.
pub fn restore_terminal() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let saved = SAVED_TERMINAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((mut tty, settings)) = saved {
            // SAFETY: tcsetattr reads the settings tcgetattr wrote, for the
            // descriptor they were read from.
            unsafe { libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &settings) };
            let _ = tty.write_all(b"\n");
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn the_soft_fd_limit_is_raised_to_the_hard_one() {
        let now = super::raise_fd_limit().expect("getrlimit works on Linux");
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_fd_limit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(now, lim.rlim_cur);
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn a_prompt_cut_short_leaves_the_terminal_as_it_found_it() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let (mut primary, mut replica) = (0, 0);
        // SAFETY: openpty writes two new descriptors, which we then own.
        let opened = unsafe {
            libc::openpty(
                &mut primary,
                &mut replica,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(opened, 0, "openpty");
        // SAFETY: both descriptors are ours alone.
        let (_primary, replica) =
            unsafe { (OwnedFd::from_raw_fd(primary), OwnedFd::from_raw_fd(replica)) };
        let path = std::fs::read_link(format!("/proc/self/fd/{}", replica.as_raw_fd())).unwrap();
        let echo = || {
            // SAFETY: as in save_terminal.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::tcgetattr(replica.as_raw_fd(), &mut t) }, 0);
            t.c_lflag & libc::ECHO != 0
        };
        let set_echo = |on: bool| {
            // SAFETY: as in save_terminal.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::tcgetattr(replica.as_raw_fd(), &mut t) }, 0);
            if on {
                t.c_lflag |= libc::ECHO;
            } else {
                t.c_lflag &= !libc::ECHO;
            }
            assert_eq!(
                unsafe { libc::tcsetattr(replica.as_raw_fd(), libc::TCSANOW, &t) },
                0
            );
        };
        assert!(echo(), "a new terminal echoes");

        // The process ends while the prompt has echo off: it is put back.
        let saved = super::save_terminal(&path);
        set_echo(false);
        assert!(super::restore_terminal());
        assert!(echo());
        drop(saved);

        // A prompt that ended put its settings back itself: nothing is
        // restored over what came after it.
        let saved = super::save_terminal(&path);
        drop(saved);
        set_echo(false);
        assert!(!super::restore_terminal());
        assert!(!echo());

        // No terminal there: nothing saved.
        let _saved = super::save_terminal(std::path::Path::new("/dev/null"));
        assert!(!super::restore_terminal());
    }
}
