//! Command-line face of the edge: `forward-edge` and the hidden `forward edge` share these args.

use std::net::IpAddr;
use std::path::PathBuf;

use crate::{CaSource, Edge, EdgeConfig, EdgeError, PortMap, DEFAULT_DOMAIN};

/// Run a local imitation of the Vers edge: TLS for *.DOMAIN on loopback, plain TCP to the VM.
#[derive(Debug, Clone, clap::Args)]
pub struct EdgeArgs {
    /// Domain whose subdomains name VMs ({vm}.DOMAIN).
    #[arg(long, default_value = DEFAULT_DOMAIN)]
    pub domain: String,

    /// Port to listen on, leading to the same port on the VM; LISTEN:VMPORT to map (0 = any free
    /// port). Repeatable.
    #[arg(
        long = "port",
        short = 'p',
        value_name = "PORT|LISTEN:VMPORT",
        required = true
    )]
    pub ports: Vec<PortMap>,

    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// Address of the VM (every VM name routes here).
    #[arg(long, default_value = "::1")]
    pub vm_addr: IpAddr,

    /// Keep the CA in this directory (ca.pem + ca.key, created if absent) so clients can trust
    /// it across runs. Without it a fresh CA is made and only its certificate is written to a
    /// temporary file.
    #[arg(long, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,

    /// End both directions at the first EOF, like an edge without half-close support.
    #[arg(long)]
    pub no_half_close: bool,

    /// Test fault: reset each connection after this many bytes.
    #[arg(long, hide = true, value_name = "BYTES")]
    pub abort_after_bytes: Option<u64>,
}

impl EdgeArgs {
    /// The configuration these arguments ask for.
    pub fn config(&self) -> EdgeConfig {
        EdgeConfig {
            domain: self.domain.clone(),
            ports: self.ports.clone(),
            bind: self.bind,
            vm_addr: self.vm_addr,
            ca: match &self.ca_dir {
                Some(dir) => CaSource::Dir(dir.clone()),
                None => CaSource::Ephemeral,
            },
            half_close: !self.no_half_close,
            abort_after_bytes: self.abort_after_bytes,
        }
    }
}

/// Start the edge, print one line per listener and where the CA is, serve until Ctrl-C or
/// SIGTERM. `json` (`forward --log-format json edge`): those lines are JSON objects, as the
/// client's, agent's and demo's are, so a script reads the port picked for 0 and the CA's path
/// without parsing prose.
pub async fn run(args: EdgeArgs, json: bool) -> Result<(), EdgeError> {
    // Handlers first: a supervisor may send SIGTERM as soon as it reads our first line.
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).map_err(EdgeError::Signal)?;
    let mut term = signal(SignalKind::terminate()).map_err(EdgeError::Signal)?;
    let edge = Edge::start(args.config()).await?;
    let (ca_path, temporary) = match edge.ca_path() {
        Some(p) => (p.to_path_buf(), false),
        None => {
            let path =
                std::env::temp_dir().join(format!("forward-edge-{}-ca.pem", std::process::id()));
            edge.ca().write_ca_pem(&path)?;
            (path, true)
        }
    };
    if json {
        for l in edge.listeners() {
            let line = serde_json::json!({ "edge": {
                "listen": l.addr.to_string(),
                "to": l.vm.to_string(),
                "domain": edge.domain(),
            }});
            say(format_args!("{line}"));
        }
        let line = serde_json::json!({ "edge_ca": ca_path.to_string_lossy() });
        say(format_args!("{line}"));
    } else {
        for l in edge.listeners() {
            say(format_args!(
                "edge listening on {} -> {} (*.{})",
                l.addr,
                l.vm,
                edge.domain()
            ));
        }
        // The whole client flag set: `--ca-file` alone, copied as printed, sent the client to
        // the real VM name's address (a tester's finding). Loopback `--bind` ports serve
        // this host only; the first listener names the address.
        let edge_ip = edge
            .listeners()
            .first()
            .map_or_else(|| "127.0.0.1".to_owned(), |l| l.addr.ip().to_string());
        let domain = match edge.domain() {
            "vm.vers.sh" => String::new(),
            d => format!(" --domain {d}"),
        };
        say(format_args!(
            "edge CA: {} (clients: forward --edge {edge_ip}{domain} --ca-file {} ...)",
            ca_path.display(),
            ca_path.display()
        ));
    }
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    edge.shutdown().await;
    if temporary {
        let _ = std::fs::remove_file(&ca_path);
    }
    Ok(())
}

/// Writes a start-up line to stdout. A reader that went away (`forward-edge ... | head -1`)
/// must not stop the edge or panic, as `println!` does on a closed pipe: a failed write is
/// dropped.
fn say(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
}
