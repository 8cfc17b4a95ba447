//! Child processes that `cargo hv` must be able to stop: each leads its own process group and
//! is killed with the whole group (SIGKILL) on a time limit, on an interrupt, on an error path
//! and when its handle is dropped. The group is only signalled while its leader is un-reaped,
//! so the group id cannot have been reused by another process by then.
//!
//! Being in their own group, children do not see a terminal's Ctrl-C; `cargo hv` sees it
//! (`qemu::install_interrupt_handler`) and ends them itself, so every path is the same.

use std::io::{self, BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::qemu::interrupted;

/// How often a wait checks its deadline and the interrupt flag.
const POLL: Duration = Duration::from_millis(50);

/// A child leading its own process group.
#[derive(Debug)]
pub struct GroupChild {
    child: Child,
    reaped: bool,
}

impl GroupChild {
    /// Spawn `cmd` as the leader of a new process group.
    pub fn spawn(cmd: &mut Command) -> io::Result<GroupChild> {
        let child = cmd.process_group(0).spawn()?;
        Ok(GroupChild {
            child,
            reaped: false,
        })
    }

    /// The child, to take its pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Kill the whole group and reap the leader (nothing if it was reaped already).
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // The leader is not reaped, so its pid (= the group id) still names this group.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// Reap the leader if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let st = self.child.try_wait()?;
        if st.is_some() {
            self.reaped = true;
        }
        Ok(st)
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Why a streamed command did not finish by itself.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("{program} did not finish within {limit:?}; killed it (a hung test?)")]
    TimedOut { program: String, limit: Duration },
    #[error("interrupted; killed {program}")]
    Interrupted { program: String },
    #[error("waiting for {program}: {source}")]
    Wait { program: String, source: io::Error },
}

/// Run `cmd` in its own process group with stdin closed and stdout piped, passing each stdout
/// line to `on_line` as it arrives (stderr is inherited). Returns its exit status; kills the
/// group when `limit` passes or an interrupt arrives.
pub fn run_streaming(
    cmd: &mut Command,
    limit: Duration,
    mut on_line: impl FnMut(&str),
) -> Result<ExitStatus, StreamError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    if interrupted() {
        return Err(StreamError::Interrupted { program });
    }
    let mut child =
        GroupChild::spawn(cmd.stdin(Stdio::null()).stdout(Stdio::piped())).map_err(|source| {
            StreamError::Spawn {
                program: program.clone(),
                source,
            }
        })?;
    let (tx, rx) = mpsc::channel::<String>();
    if let Some(out) = child.child_mut().stdout.take() {
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    } else {
        drop(tx);
    }
    let deadline = Instant::now() + limit;
    let mut open = true;
    loop {
        if interrupted() {
            child.kill();
            return Err(StreamError::Interrupted { program });
        }
        if Instant::now() >= deadline {
            child.kill();
            return Err(StreamError::TimedOut { program, limit });
        }
        if open {
            match rx.recv_timeout(POLL) {
                Ok(line) => on_line(&line),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        } else {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(source) => {
                    child.kill();
                    return Err(StreamError::Wait { program, source });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_command_passes_lines_and_status() {
        let mut lines = Vec::new();
        let st = run_streaming(
            Command::new("sh").args(["-c", "echo one; echo two >&2; echo three; exit 3"]),
            Duration::from_secs(20),
            |l| lines.push(l.to_string()),
        )
        .unwrap();
        assert_eq!(st.code(), Some(3));
        assert_eq!(lines, ["one", "three"]);
    }

    #[test]
    fn hung_command_is_killed_at_its_limit_with_its_group() {
        let marker = std::env::temp_dir().join(format!("hv-proc-orphan-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let start = Instant::now();
        let e = run_streaming(
            Command::new("sh").args(["-c", &script]),
            Duration::from_millis(300),
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, StreamError::TimedOut { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(20));
        thread::sleep(Duration::from_secs(3));
        assert!(!marker.exists(), "a process of the group outlived the kill");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let e = run_streaming(
            &mut Command::new("/nonexistent/prog"),
            Duration::from_secs(1),
            |_| {},
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("cannot run /nonexistent/prog"),
            "{e}"
        );
    }
}
