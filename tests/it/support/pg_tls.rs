//! A second, throwaway PostgreSQL server of one test's own, which it may restart; with `tls`, it
//! accepts TLS only, with a CA and a server certificate made for the test (naming `localhost` only).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::unique_name;

pub struct TlsPostgres {
    pub dir: PathBuf,
    pub port: u16,
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    bin: PathBuf,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// Runs a PostgreSQL binary, as the `postgres` user when the tests run as root.
fn pg(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

/// Where the PostgreSQL server binaries are: `OUTBOX_TEST_PG_CTL` when set (scripts/test.sh sets
/// it), else `pg_ctl` on the PATH, else the newest `/usr/lib/postgresql/<version>/bin`. Tests that
/// run against a server of the user's own (`DATABASE_URL`) still start this one of their own.
fn pg_bin_dir() -> PathBuf {
    if let Ok(pg_ctl) = std::env::var("OUTBOX_TEST_PG_CTL") {
        return Path::new(&pg_ctl).parent().expect("OUTBOX_TEST_PG_CTL names a file").to_path_buf();
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|dir| dir.join("pg_ctl").is_file());
    if let Some(dir) = on_path {
        // Debian's /usr/bin/pg_ctl is a wrapper; initdb lives beside the real one.
        let real = std::fs::canonicalize(dir.join("pg_ctl")).unwrap_or_else(|_| dir.join("pg_ctl"));
        let real_dir = real.parent().unwrap().to_path_buf();
        if real_dir.join("initdb").is_file() {
            return real_dir;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("pg_ctl").is_file() && bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "this test starts a PostgreSQL server of its own and found no server binaries (initdb, pg_ctl): \
             install them (apt-get install postgresql) or set OUTBOX_TEST_PG_CTL to the pg_ctl to use"
        )
    })
}

fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let crt = dir.join(format!("{name}.pem"));
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt));
    (key, crt)
}

impl TlsPostgres {
    pub fn start() -> Self {
        Self::start_with(true)
    }

    /// Stops and starts the server (fast shutdown: sessions are cut).
    pub fn restart(&self) {
        run(pg(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "-t", "60", "restart"])
            .arg("-l")
            .arg(self.dir.join("server.log")));
    }

    /// Stops the server as a crash would (`-m immediate`: no checkpoint, WAL not yet written is
    /// lost), then starts it again (it recovers from its WAL).
    pub fn crash_and_restart(&self) {
        run(pg(&self.bin, "pg_ctl").arg("-D").arg(self.dir.join("data")).args(["-m", "immediate", "-w", "stop"]));
        run(pg(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-t", "60", "start"])
            .arg("-l")
            .arg(self.dir.join("server.log")));
    }

    pub fn start_with(tls: bool) -> Self {
        let bin = pg_bin_dir();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique_name("tls-pg"));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca_key, ca) = make_ca(&dir, "test-ca");
        let (_, other_ca) = make_ca(&dir, "other-ca");
        let (key, csr, crt, ext) =
            (dir.join("server.key"), dir.join("server.csr"), dir.join("server.crt"), dir.join("san.ext"));
        std::fs::write(&ext, "subjectAltName=DNS:localhost\n").unwrap();
        run(Command::new("openssl")
            .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&csr));
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-CAcreateserial")
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&crt));
        let data = dir.join("data");
        if is_root() {
            run(Command::new("chown").args(["-R", "postgres"]).arg(&dir));
            // Every folder above must be traversable by the postgres user.
            let mut p = dir.parent();
            while let Some(d) = p {
                let _ = Command::new("chmod").arg("o+x").arg(d).status();
                p = d.parent();
            }
        }
        run(pg(&bin, "initdb").arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
        ]));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nssl = {}\nssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\nmax_connections = 100\n",
            dir.display(), if tls { "on" } else { "off" }, crt.display(), key.display()
        );
        let mut c = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        c.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), c).unwrap();
        // With TLS: TLS or nothing.
        let hba = if tls {
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 reject\n"
        } else {
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        };
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        if is_root() {
            run(Command::new("chown").args(["-R", "postgres"]).arg(&dir));
            run(Command::new("chmod").arg("600").arg(&key));
        }
        run(pg(&bin, "pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "60", "start"]));
        TlsPostgres { dir, port, ca, other_ca, bin }
    }

    pub fn url(&self, host: &str, params: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{params}", self.port)
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = pg(&self.bin, "pg_ctl").arg("-D").arg(self.dir.join("data")).args(["-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
