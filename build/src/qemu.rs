//! Booting an image under QEMU: the command line, the time limit, the console stream, and the
//! guarantee that no QEMU outlives its run.
//!
//! QEMU is started in its own process group (so a terminal's Ctrl-C reaches us, not it, and we
//! decide what happens) and is killed as a group — on timeout, on interrupt, on any error
//! path, and when its handle is dropped. The group is only signalled while its leader is
//! un-reaped, so the id cannot have been reused by then.
//!
//! Interrupts (SIGINT, SIGTERM, SIGHUP) only set a flag ([`install_interrupt_handler`]); every
//! running [`run`] polls it and kills its QEMU, and new runs refuse to start.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::console::Console;
use crate::outcome::Ending;
use crate::process::GroupChild;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// How often a run checks its deadline and the interrupt flag.
const POLL: Duration = Duration::from_millis(50);
/// Console lines kept per run (oldest dropped first) so a chatty, long run stays bounded.
pub const MAX_KEPT_LINES: usize = 100_000;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static HANDLER: OnceLock<Result<(), String>> = OnceLock::new();

/// Route SIGINT, SIGTERM and SIGHUP to the interrupt flag (once per process).
pub fn install_interrupt_handler() -> Result<(), String> {
    HANDLER
        .get_or_init(|| {
            ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
                .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))
        })
        .clone()
}

/// True once an interrupt has arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// One QEMU boot of `core-hv` with a boot image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    /// The boot image (`-initrd`); `None` boots without one (the hypervisor must refuse).
    pub initrd: Option<PathBuf>,
    pub smp: u32,
    pub memory_mib: u32,
    /// Kernel command-line words (`-append`).
    pub append: Vec<String>,
}

/// QEMU arguments (to go after the project's own, which put COM1 on stdio) that give the
/// machine a second UART, COM2, on a unix socket at `path`: the management line `hvctl`
/// talks to ctl-dom over (the hypervisor relays it with `domctl MGMT_IO`). QEMU listens
/// without waiting for a client; bytes sent while none is connected are dropped.
pub fn mgmt_socket_args(path: &Path) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=mgmt,path={},server=on,wait=off", path.display()),
        "-serial".into(),
        "chardev:mgmt".into(),
    ]
}

impl QemuConfig {
    /// The argument list (the project's one QEMU command line: TCG, q35, serial on stdio,
    /// `isa-debug-exit` for the verdict, `-no-reboot` so a triple fault ends the run).
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = [
            "-accel",
            "tcg,thread=multi",
            "-machine",
            "q35",
            "-cpu",
            "max",
            "-smp",
            &self.smp.to_string(),
            "-m",
            &format!("{}M", self.memory_mib),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        a.push(self.kernel.clone().into());
        if let Some(initrd) = &self.initrd {
            a.push("-initrd".into());
            a.push(initrd.clone().into());
        }
        if !self.append.is_empty() {
            a.push("-append".into());
            a.push(self.append.join(" ").into());
        }
        a
    }

    /// The command line as a shell would show it (for logs and failure messages).
    pub fn command_line(&self) -> String {
        let mut s = self.qemu.display().to_string();
        for a in self.args() {
            let a = a.to_string_lossy();
            if a.contains(' ') || a.is_empty() {
                s.push_str(&format!(" '{a}'"));
            } else {
                s.push(' ');
                s.push_str(&a);
            }
        }
        s
    }
}

/// What one run saw.
#[derive(Debug)]
pub struct Run {
    pub ending: Ending,
    pub console: Console,
    /// QEMU's own messages (its errors, not the guest's).
    pub stderr: String,
    /// From spawning QEMU to its exit (or kill).
    pub wall: Duration,
}

fn ending_of(status: ExitStatus) -> Ending {
    match (status.code(), status.signal()) {
        (Some(c), _) => Ending::Exited(c),
        (None, Some(s)) => Ending::Signalled(s),
        (None, None) => Ending::Exited(-1),
    }
}

/// Boot under QEMU and return when it exits, when `timeout` passes, or on an interrupt.
/// Each console line is passed to `on_line` as it arrives.
pub fn run(
    cfg: &QemuConfig,
    timeout: Option<Duration>,
    on_line: impl FnMut(&str),
) -> io::Result<Run> {
    run_with_args(cfg, &[], timeout, on_line)
}

/// [`run`] with `extra` QEMU arguments after the project's own (devices a scenario needs,
/// e.g. `-device intel-iommu` and a disk).
pub fn run_with_args(
    cfg: &QemuConfig,
    extra: &[String],
    timeout: Option<Duration>,
    mut on_line: impl FnMut(&str),
) -> io::Result<Run> {
    if interrupted() {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "interrupted: not starting QEMU",
        ));
    }
    let start = Instant::now();
    let deadline = timeout.map(|t| start + t);
    let mut qemu = GroupChild::spawn(
        Command::new(&cfg.qemu)
            .args(cfg.args())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start {}: {e}", cfg.qemu.display()),
        )
    })?;
    let stdout = qemu.child_mut().stdout.take();
    let stderr = qemu.child_mut().stderr.take();

    let (tx, rx) = mpsc::channel::<String>();
    let reader = stdout.map(|out| {
        thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        })
    });
    let err_reader = stderr.map(|mut err| {
        thread::spawn(move || {
            let mut b = Vec::new();
            let _ = err.read_to_end(&mut b);
            String::from_utf8_lossy(&b).into_owned()
        })
    });

    let mut lines: std::collections::VecDeque<String> = Default::default();
    let mut keep = |line: String, on_line: &mut dyn FnMut(&str)| {
        on_line(&line);
        if lines.len() == MAX_KEPT_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    };
    let mut stdout_open = reader.is_some();
    let ending = loop {
        if interrupted() {
            qemu.kill();
            break Ending::Interrupted;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            qemu.kill();
            break Ending::TimedOut;
        }
        let wait = deadline.map_or(POLL, |d| POLL.min(d - now));
        if stdout_open {
            match rx.recv_timeout(wait) {
                Ok(line) => keep(line, &mut on_line),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stdout_open = false,
            }
        } else {
            // The console closed: QEMU is exiting. Reap it (still bounded by the deadline).
            match qemu.try_wait() {
                Ok(Some(status)) => break ending_of(status),
                Ok(None) => thread::sleep(wait.min(Duration::from_millis(5))),
                Err(e) => {
                    qemu.kill();
                    return Err(e);
                }
            }
        }
    };
    let wall = start.elapsed();
    // Killed or exited: the pipe is closed or closing; collect what was still in flight.
    qemu.kill();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
        keep(line, &mut on_line);
    }
    if let Some(r) = reader {
        let _ = r.join();
    }
    let stderr = err_reader.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Run {
        ending,
        console: Console::new(lines.into()),
        stderr,
        wall,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn config(qemu: PathBuf) -> QemuConfig {
        QemuConfig {
            qemu,
            kernel: "/k/core-hv".into(),
            initrd: Some("/k/default.img".into()),
            smp: 4,
            memory_mib: 256,
            append: vec!["exit_when_done".into(), "test_fault=ud".into()],
        }
    }

    #[test]
    fn command_line_is_the_project_one() {
        let c = config(QEMU.into());
        assert_eq!(
            c.command_line(),
            "qemu-system-x86_64 -accel tcg,thread=multi -machine q35 -cpu max -smp 4 -m 256M \
             -nodefaults -display none -no-reboot -monitor none -serial stdio \
             -device isa-debug-exit,iobase=0xf4,iosize=0x04 -kernel /k/core-hv \
             -initrd /k/default.img -append 'exit_when_done test_fault=ud'"
        );
        let mut c = c;
        c.append.clear();
        c.initrd = None;
        assert!(!c.command_line().contains("-append"));
        assert!(!c.command_line().contains("-initrd"));
    }

    /// A stand-in QEMU: a shell script, so the runner's real process handling is exercised.
    fn fake_qemu(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hv-qemu-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn run_collects_console_and_exit_status() {
        let q = fake_qemu(
            "exits",
            "printf 'hello\\r\\nbulkhead: ready: 4 CPUs, 1 MiB free, 0 boot domains\\n'; \
             echo oops >&2; printf 'no newline'; exit 33",
        );
        let mut seen = Vec::new();
        let r = run(&config(q), Some(Duration::from_secs(20)), |l| {
            seen.push(l.to_string())
        })
        .unwrap();
        assert_eq!(r.ending, Ending::Exited(33));
        assert_eq!(r.console.lines().len(), 3);
        assert_eq!(r.console.lines()[2], "no newline");
        assert_eq!(r.console.ready().unwrap().cpus, 4);
        assert_eq!(seen, r.console.lines());
        assert_eq!(r.stderr, "oops\n");
    }

    #[test]
    fn run_kills_the_whole_group_on_timeout() {
        let marker = std::env::temp_dir().join(format!("hv-qemu-orphan-{}", std::process::id()));
        let _ = fs::remove_file(&marker);
        // The "QEMU" starts a grandchild that would write the marker if it survived the kill.
        let q = fake_qemu(
            "hangs",
            &format!(
                "(sleep 2; touch {}) & echo started; sleep 30",
                marker.display()
            ),
        );
        let r = run(&config(q), Some(Duration::from_millis(500)), |_| {}).unwrap();
        assert_eq!(r.ending, Ending::TimedOut);
        assert_eq!(r.console.lines(), ["started"]);
        assert!(r.wall < Duration::from_secs(20));
        thread::sleep(Duration::from_secs(3));
        assert!(
            !marker.exists(),
            "a process of QEMU's group outlived the run"
        );
    }

    #[test]
    fn run_reports_a_missing_qemu_as_an_error() {
        let e = run(&config("/nonexistent/qemu".into()), None, |_| {}).unwrap_err();
        assert!(
            e.to_string().contains("cannot start /nonexistent/qemu"),
            "{e}"
        );
    }

    #[test]
    fn run_reports_death_by_signal() {
        let q = fake_qemu("dies", "kill -SEGV $$");
        let r = run(&config(q), Some(Duration::from_secs(20)), |_| {}).unwrap();
        assert_eq!(r.ending, Ending::Signalled(11));
    }
}
