//! A real PostgreSQL server listening on [::1] only (as on a Vers VM), reached with psql and
//! pgbench through forward.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use crate::harness::{account, free_v6_port, is_root, run, skip_unless_root, Proc, Src, TempDir};
use crate::net::Local;
use crate::stack::{Stack, Transport};

per_transport!(psql_and_pgbench);

struct Postgres {
    bin: PathBuf,
    port: u16,
    // Field order matters: the server stops before its data directory is removed.
    _server: Proc,
    _dir: TempDir,
}

fn pg_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").is_file() && b.join("postgres").is_file())
        .collect();
    // Highest major version last ("9.6" < "15" numerically).
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.split('.').next()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

impl Postgres {
    /// None = skipped (not root and no usable installation).
    fn start() -> Option<Postgres> {
        let Some(bin) = pg_bin_dir() else {
            skip_unless_root(
                "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (run scripts/test-env.sh)",
            );
            return None;
        };
        let dir = TempDir::new("pg");
        // PostgreSQL refuses to run as root: as root, run it as the `postgres` account.
        let ids = if is_root() {
            let ids = account("postgres").expect("no `postgres` account (run scripts/test-env.sh)");
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1)).unwrap();
            Some(ids)
        } else {
            None
        };
        let as_pg = |program: PathBuf| {
            let mut cmd = Command::new(program);
            cmd.current_dir(dir.path());
            if let Some((uid, gid)) = ids {
                cmd.uid(uid).gid(gid);
            }
            cmd
        };

        let data = dir.join("data");
        let mut initdb = as_pg(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "--auth=trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--no-locale",
        ]);
        let (st, out, err) = run("initdb", initdb);
        assert!(st.success(), "initdb failed ({st}):\n{out}\n{err}");

        let port = free_v6_port();
        let mut server = as_pg(bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .arg("-k")
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=::1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=30",
            ]);
        // SIGINT = fast shutdown: the server ends its backends and exits cleanly.
        let mut server = Proc::spawn("postgres", server).stop_with("INT");
        server.wait_line(Src::Stderr, "postgres ready", |l| {
            l.contains("database system is ready to accept connections")
        });
        Some(Postgres {
            bin,
            port,
            _server: server,
            _dir: dir,
        })
    }

    fn client(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.env("PGCONNECT_TIMEOUT", "30");
        cmd
    }
}

fn psql_and_pgbench(t: Transport) {
    let Some(pg) = Postgres::start() else { return };
    let stack = Stack::start(t, &[pg.port]);
    // Default bind (127.0.0.1 and ::1), as a user would run it; libpq tries each address of localhost.
    let fwd = stack.forward(&[], &[format!("0:{}", stack.target(pg.port))], 2);
    let lport = match fwd
        .locals
        .iter()
        .find(|l| matches!(l, Local::Tcp(a) if a.is_ipv4()))
    {
        Some(Local::Tcp(a)) => a.port(),
        _ => panic!("no IPv4 listener among {:?}", fwd.locals),
    };

    let mut psql = pg.client("psql");
    psql.arg(format!(
        "host=localhost port={lport} user=postgres dbname=postgres"
    ))
    .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
    .args(["-c", "select 'forward-ok', 6*7"]);
    let (st, out, err) = run("psql", psql);
    assert!(st.success(), "psql failed ({st}):\n{out}\n{err}");
    assert_eq!(out.trim(), "forward-ok|42", "psql output; stderr:\n{err}");

    let conn = [
        "-h",
        "localhost",
        "-p",
        &lport.to_string(),
        "-U",
        "postgres",
    ];
    let mut init = pg.client("pgbench");
    init.args(["-i", "-s", "1", "-q"])
        .args(conn)
        .arg("postgres");
    let (st, out, err) = run("pgbench -i", init);
    assert!(st.success(), "pgbench -i failed ({st}):\n{out}\n{err}");

    let mut bench = pg.client("pgbench");
    bench
        .args(["-T", "3", "-c", "4", "-j", "2"])
        .args(conn)
        .arg("postgres");
    let (st, out, err) = run("pgbench", bench);
    assert!(st.success(), "pgbench failed ({st}):\n{out}\n{err}");
    assert!(
        out.contains("number of transactions actually processed"),
        "pgbench output:\n{out}\n{err}"
    );
    assert!(
        !out.contains("number of failed transactions: ")
            || out.contains("number of failed transactions: 0 "),
        "pgbench reports failed transactions:\n{out}"
    );
}
