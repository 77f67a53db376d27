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
}
