//! Files the tests make under the temp dir.

use std::path::PathBuf;

/// The smallest config file: listener `one` on 127.0.0.1:0, its pool one
/// server, 127.0.0.1:9.
pub const MINIMAL_CONFIG: &str = r#"
[[listener]]
name = "one"
listen = ["127.0.0.1:0"]
[listener.pool]
servers = [{ address = "127.0.0.1:9" }]
"#;

/// `text` in a `.toml` file under the temp dir, unique to this process and
/// `name`.
pub fn temp_config(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("spliced-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// A file holding `secret`, with this mode, in a directory anyone may search.
pub fn secret_file(name: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("spliced-private-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("password");
    std::fs::write(&path, "secret\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}
