//! `spliced check` as a preflight: beyond the file, what `run` needs of
//! the host (password files readable, as `--user` too; warnings for loose
//! password file modes and names that do not resolve), and the effective
//! config it prints, `admin` included, parsing back to itself.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use spliced::config::{self, FlagDefaults};

/// `MINIMAL_CONFIG` with a postgres role check reading `password_file`, and a
/// second server `extra` beside the first.
fn with_password_file(password_file: &std::path::Path, extra: &str) -> String {
    MINIMAL_CONFIG.replace(
        "servers = [{ address = \"127.0.0.1:9\" }]",
        &format!("servers = [{{ address = \"127.0.0.1:9\" }}{extra}]"),
    ) + &format!(
        "[listener.pool.health]\ncheck = \"postgres\"\nrole = \"primary\"\nuser = \"u\"\npassword-file = \"{}\"\n",
        password_file.display()
    )
}

fn check(text_name: &str, text: &str, extra_args: &[&str]) -> (Option<i32>, String, String) {
    let path = temp_config(text_name, text);
    let mut args = vec!["check", "--config", path.to_str().unwrap()];
    args.extend_from_slice(extra_args);
    let (status, stdout, stderr) = run_bin(&args, Duration::from_secs(20));
    let _ = std::fs::remove_file(path);
    (status.and_then(|s| s.code()), stdout, stderr)
}

/// The one line of `stderr` that starts `spliced: error: ` (there must be
/// exactly one).
fn the_error_line(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("spliced: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0]
}

/// `stderr` is one line, starting with `prefix` and containing every one
/// of `needles`.
fn assert_one_line(stderr: &str, prefix: &str, needles: &[&str]) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with(prefix), "{stderr}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle}: {stderr}");
    }
}

#[test]
fn check_fails_for_a_missing_password_file_naming_listener_key_and_path() {
    let (code, stdout, stderr) = check(
        "pw-missing",
        &with_password_file(std::path::Path::new("/nonexistent/pw"), ""),
        &[],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_one_line(
        &stderr,
        "spliced: error: ",
        &[
            "listener 'one'",
            "pool.health.password-file /nonexistent/pw",
            "No such file",
        ],
    );
}

#[test]
fn check_fails_for_a_password_file_the_run_as_user_cannot_read() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: testing a file as another user needs the test to run as root");
        return;
    }
    let private = secret_file("private", 0o600);
    let text = with_password_file(&private, "");
    // Root reads it: as the process itself, it passes.
    let (code, _, stderr) = check("pw-root", &text, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    // nobody cannot, and a reload under `run --user nobody` would fail.
    let (code, stdout, stderr) = check("pw-nobody", &text, &["--user", "nobody"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let error = the_error_line(&stderr);
    for needle in [
        "listener 'one'",
        &format!("pool.health.password-file {}", private.display()),
        "as user nobody",
        "Permission denied",
    ] {
        assert!(error.contains(needle), "{needle}: {stderr}");
    }
    // Readable by others, nobody reads it (with a warning about the mode).
    let open = secret_file("open", 0o644);
    let open_text = with_password_file(&open, "");
    let (code, _, stderr) = check("pw-open", &open_text, &["--user", "nobody"]);
    assert_eq!(code, Some(0), "{stderr}");
    // The config file itself: a reload re-reads it as nobody.
    let config = secret_file("config", 0o600);
    std::fs::write(&config, &open_text).unwrap();
    let (status, stdout, stderr) = run_bin(
        &[
            "check",
            "--user",
            "nobody",
            "--config",
            config.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        the_error_line(&stderr).contains("cannot read the config file as user nobody"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
    let (code, _, stderr) = check("pw-nouser", &text, &["--user", "no-such-user-here"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no such user"), "{stderr}");
    for p in [private, open] {
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}

#[test]
fn a_group_readable_password_file_is_a_warning_in_check_and_at_start() {
    let loose = secret_file("loose", 0o640);
    let root = nix::unistd::geteuid().is_root();
    if root {
        // Group access is allowed only to a file root owns: give it away.
        let nobody = Some(nix::unistd::Uid::from_raw(65534));
        nix::unistd::chown(&loose, nobody, Some(nix::unistd::Gid::from_raw(65534))).unwrap();
    }
    let text = with_password_file(&loose, "");
    let (code, stdout, stderr) = check("pw-loose", &text, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("[[listener]]"), "{stdout}");
    let warning = format!(
        "spliced: warning: {}",
        std::env::temp_dir()
            .join(format!("spliced-{}-pw-loose.toml", std::process::id()))
            .display()
    );
    assert_one_line(
        &stderr,
        "spliced: warning: ",
        &[
            warning.as_str(),
            "listener 'one'",
            &format!("pool.health.password-file {}", loose.display()),
            "group or other access (mode 0640)",
            "u=rw (0600)",
        ],
    );
    // 0600 is quiet.
    let tight = secret_file("tight", 0o600);
    let (code, _, stderr) = check("pw-tight", &with_password_file(&tight, ""), &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    // A file root owns may be read by its group (a Secret under a pod's
    // fsGroup), not by others.
    if root {
        let fs_group = secret_file("fsgroup", 0o440);
        let (code, _, stderr) = check("pw-fsgroup", &with_password_file(&fs_group, ""), &[]);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stderr.is_empty(), "{stderr}");
        let open = secret_file("rootopen", 0o644);
        let (code, _, stderr) = check("pw-rootopen", &with_password_file(&open, ""), &[]);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            stderr.contains("group or other access (mode 0644)")
                && stderr.contains("u=rw,g=r (0640) for a file root owns"),
            "{stderr}"
        );
        for p in [fs_group, open] {
            let _ = std::fs::remove_dir_all(p.parent().unwrap());
        }
    } else {
        println!("not root: the root-owned cases need root to make a file root owns");
    }
    // `run` says the same at start.
    let echo = echo_server();
    let served = text.replace("127.0.0.1:9", &echo.addr.to_string());
    let path = temp_config("pw-run", &served);
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--workers", "1", "--name", "pwrun", "--config"])
        .arg(&path)
        .env(
            "RUNTIME_DIRECTORY",
            std::env::temp_dir().join(format!("spliced-pwrun-{}", std::process::id())),
        );
    let proxy = Spliced::spawn(cmd);
    wait_until(
        Duration::from_secs(10),
        "the start warns of the mode",
        || {
            proxy.logs().iter().any(|l| {
                l.contains("WARN")
                    && l.contains("group or other access (mode 0640)")
                    && l.contains("listener 'one'")
            })
        },
    );
    drop(proxy);
    let _ = std::fs::remove_file(path);
    for p in [loose, tight] {
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}

#[test]
fn check_warns_of_a_name_that_does_not_resolve_and_exits_zero() {
    let text = MINIMAL_CONFIG.replace(
        "servers = [{ address = \"127.0.0.1:9\" }]",
        "servers = [{ address = \"127.0.0.1:9\" }, \"db.spliced-test.invalid:5432\"]",
    );
    let (code, stdout, stderr) = check("unresolved", &text, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("address = \"db.spliced-test.invalid:5432\""),
        "{stdout}"
    );
    assert_one_line(
        &stderr,
        "spliced: warning: ",
        &[
            "listener 'one'",
            "server db.spliced-test.invalid:5432 does not resolve",
            "starts without it",
        ],
    );
}

#[test]
fn check_prints_admin_and_it_parses_back() {
    for (written, printed) in [
        ("127.0.0.1:9100", "127.0.0.1:9100"),
        ("[::1]:9100", "[::1]:9100"),
    ] {
        let text = format!("admin = \"{written}\"\n{MINIMAL_CONFIG}");
        let path = temp_config("admin", &text);
        let (status, stdout, stderr) = run_bin(
            &["check", "--config", path.to_str().unwrap()],
            Duration::from_secs(20),
        );
        let _ = std::fs::remove_file(path);
        assert!(status.is_some_and(|s| s.success()), "{stderr}");
        assert!(
            stdout.starts_with(&format!("admin = \"{printed}\"\n")),
            "{stdout}"
        );
        let again = config::parse_str(&stdout, &FlagDefaults::default()).unwrap();
        assert_eq!(again.config.ops.admin, Some(printed.parse().unwrap()));
        assert_eq!(config::effective_toml(&again.config), stdout);
    }
    // No admin key, none printed.
    let plain = config::parse_str(MINIMAL_CONFIG, &FlagDefaults::default()).unwrap();
    assert!(!config::effective_toml(&plain.config).contains("admin"));
}
