//! Starts the path between a local client and a "VM service" for one transport:
//!
//! ```text
//!   Direct:   client -> forward -TLS-> edge 127.0.0.1:P -TCP-> service [::1]:P
//!   AgentTls: client -> forward =TLS carrier=> edge 127.0.0.1:A -TCP-> agent [::1]:A -> service [::1]:P
//!   AgentTcp: client -> forward =plain TCP carrier=> agent [::1]:A -> service [::1]:P
//!   Quic:     client -> forward =QUIC=> agent udp [::1]:A -> service [::1]:P
//! ```
//!
//! Every scenario takes a `Transport` and asks `Stack` for the processes and the client flags, so
//! one scenario body covers every transport.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::harness::{Proc, Src, TempDir};
use crate::net::Local;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Direct,
    AgentTls,
    AgentTcp,
    Quic,
}

impl Transport {
    pub fn mode_label(self) -> &'static str {
        match self {
            Transport::Direct => "direct",
            Transport::AgentTls => "agent tls",
            Transport::AgentTcp => "agent tcp",
            Transport::Quic => "agent quic",
        }
    }
}

/// The VM name every test forwards to; with the default domain its TLS name is vm1.vm.vers.sh.
pub const VM: &str = "vm1";
pub const VM_FQDN: &str = "vm1.vm.vers.sh";

/// Edge and/or agent for one transport, reaching services on the given [::1] ports.
pub struct Stack {
    pub transport: Transport,
    pub dir: TempDir,
    /// The edge's CA (PEM), for `--ca-file`. Absent for transports without an edge.
    pub ca: Option<PathBuf>,
    edge: Option<Proc>,
    /// Edge listening port for each VM port it leads to.
    edge_ports: std::collections::HashMap<u16, u16>,
    agent: Option<Proc>,
    agent_port: Option<u16>,
    agent_pin: Option<String>,
    token_file: Option<PathBuf>,
}

impl Stack {
    pub fn start(transport: Transport, service_ports: &[u16]) -> Stack {
        Stack::start_with_edge_args(transport, service_ports, &[])
    }

    /// Like `start`, with extra flags for the edge (e.g. `--no-half-close`, `--abort-after-bytes N`).
    /// Panics for transports without an edge.
    pub fn start_with_edge_args(
        transport: Transport,
        service_ports: &[u16],
        edge_args: &[&str],
    ) -> Stack {
        assert!(
            edge_args.is_empty() || matches!(transport, Transport::Direct | Transport::AgentTls),
            "{transport:?} has no edge to pass {edge_args:?} to"
        );
        let dir = TempDir::new("stack");
        let mut stack = Stack {
            transport,
            dir,
            ca: None,
            edge: None,
            edge_ports: Default::default(),
            agent: None,
            agent_port: None,
            agent_pin: None,
            token_file: None,
        };
        match transport {
            Transport::Direct => stack.start_edge(service_ports, edge_args),
            Transport::AgentTls => {
                let a = stack.start_agent(false, 0);
                stack.start_edge(&[a], edge_args);
            }
            Transport::AgentTcp => {
                stack.start_agent(false, 0);
            }
            Transport::Quic => {
                stack.start_agent(true, 0);
            }
        }
        stack
    }

    fn start_edge(&mut self, ports: &[u16], extra: &[&str]) {
        let ca_dir = self.dir.join("edge-ca");
        let mut args: Vec<OsString> = vec!["edge".into()];
        // The edge picks its own free ports (0:VMPORT) rather than reusing the VM port number on
        // 127.0.0.1, which another test's connection might hold at that moment.
        for p in ports {
            args.push("--port".into());
            args.push(format!("0:{p}").into());
        }
        args.push("--ca-dir".into());
        args.push(ca_dir.into());
        args.extend(extra.iter().map(OsString::from));
        let mut edge = Proc::forward("edge", args);
        // `edge listening on 127.0.0.1:X -> [::1]:P (*.vm.vers.sh)`
        let lines = edge.wait_lines(Src::Stdout, ports.len(), "edge listening lines", |l| {
            l.starts_with("edge listening on ")
        });
        for line in lines {
            let addrs: Vec<std::net::SocketAddr> = line
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            assert_eq!(addrs.len(), 2, "unexpected edge line {line:?}");
            self.edge_ports.insert(addrs[1].port(), addrs[0].port());
        }
        let ca_line = edge.wait_line(Src::Stdout, "the `edge CA: PATH` line", |l| {
            l.starts_with("edge CA: ")
        });
        // `edge CA: PATH (clients: ...)`: the path is the first word.
        let ca = ca_line
            .trim_start_matches("edge CA: ")
            .split_whitespace()
            .next()
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("no path in {ca_line:?}"));
        assert!(
            ca.is_file(),
            "edge printed CA path {ca:?} but it is not a file"
        );
        self.ca = Some(ca);
        self.edge = Some(edge);
    }

    /// Starts `forward agent` on [::1]:`port` (0 = the agent picks and prints it); returns the port.
    /// The token file is made once per stack, so a restarted agent accepts the same clients.
    fn start_agent(&mut self, quic: bool, port: u16) -> u16 {
        let token_file = self.dir.join("token");
        if !token_file.exists() {
            let token: String = (0..32)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect();
            std::fs::write(&token_file, token).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let mut args: Vec<OsString> = vec![
            "agent".into(),
            "--listen".into(),
            format!("[::1]:{port}").into(),
            "--token-file".into(),
            token_file.clone().into(),
        ];
        if quic {
            // A scratch state dir keeps the generated QUIC certificate out of ~/.forward.
            args.extend([
                "--quic".into(),
                "--state-dir".into(),
                self.dir.join("agent-state").into(),
            ]);
        }
        let mut agent = Proc::forward("agent", args);
        let port = listening_port(&mut agent);
        if quic {
            let pin = agent.wait_line(Src::Stdout, "the agent's SPKI pin", |l| {
                l.contains("sha256:")
            });
            let pin = pin
                .split_whitespace()
                .find(|w| w.starts_with("sha256:"))
                .unwrap()
                .to_string();
            self.agent_pin = Some(pin);
        }
        self.agent = Some(agent);
        self.agent_port = Some(port);
        self.token_file = Some(token_file);
        port
    }

    /// The agent's port (agent transports only).
    pub fn agent_port(&self) -> u16 {
        self.agent_port.expect("this transport has no agent")
    }

    /// The agent process (agent transports only).
    pub fn agent_proc(&self) -> &Proc {
        self.agent.as_ref().expect("this transport has no agent")
    }

    /// The agent process, to signal it (agent transports only).
    pub fn agent_proc_mut(&mut self) -> &mut Proc {
        self.agent.as_mut().expect("this transport has no agent")
    }

    /// SIGKILLs the agent (the edge, if any, stays up).
    pub fn kill_agent(&mut self) {
        self.agent
            .as_mut()
            .expect("this transport has no agent")
            .kill();
    }

    /// Starts the agent again on the same port with the same token.
    pub fn restart_agent(&mut self) {
        let port = self.agent_port();
        if let Some(mut old) = self.agent.take() {
            old.kill();
        }
        self.start_agent(self.transport == Transport::Quic, port);
    }

    /// The remote port a client names to reach the service on [::1]:`service_port`: the edge's
    /// port for it in direct mode, the service's own port when the agent dials it.
    pub fn rport(&self, service_port: u16) -> u16 {
        match self.transport {
            Transport::Direct => *self
                .edge_ports
                .get(&service_port)
                .unwrap_or_else(|| panic!("the edge was not started for port {service_port}")),
            _ => service_port,
        }
    }

    /// `vm1:RPORT` for a spec or `forward stdio`.
    pub fn target(&self, service_port: u16) -> String {
        format!("{VM}:{}", self.rport(service_port))
    }

    /// Flags that point a `forward` (or `forward stdio`) client at this stack.
    pub fn client_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        match self.transport {
            Transport::Direct | Transport::AgentTls => {
                args.extend(["--edge".into(), "127.0.0.1".into()]);
                args.extend(["--ca-file".into(), self.ca.clone().unwrap().into()]);
            }
            Transport::AgentTcp | Transport::Quic => {
                args.extend(["--edge".into(), "::1".into()]);
            }
        }
        if let Some(port) = self.agent_port {
            // Through the edge the client names the edge's port for the agent.
            let port = self.edge_ports.get(&port).copied().unwrap_or(port);
            args.extend(["--agent".into(), port.to_string().into()]);
            let t = match self.transport {
                Transport::AgentTls => "tls",
                Transport::AgentTcp => "tcp",
                _ => "quic",
            };
            args.extend(["--transport".into(), t.into()]);
            args.extend([
                "--token-file".into(),
                self.token_file.clone().unwrap().into(),
            ]);
        }
        if let Some(pin) = &self.agent_pin {
            args.extend(["--agent-pin".into(), pin.into()]);
        }
        args
    }

    /// Starts `forward [client args] [extra] SPECS` and waits for `listeners` forwarding lines.
    pub fn forward(&self, extra: &[&str], specs: &[String], listeners: usize) -> Forward {
        self.forward_logging("info", extra, specs, listeners)
    }

    /// [`Stack::forward`] with forward logging at `filter` (a RUST_LOG value).
    pub fn forward_logging(
        &self,
        filter: &str,
        extra: &[&str],
        specs: &[String],
        listeners: usize,
    ) -> Forward {
        let mut args = self.client_args();
        args.extend(extra.iter().map(OsString::from));
        args.extend(specs.iter().map(OsString::from));
        Forward::start_with(
            Proc::forward_logging("forward", args, filter),
            listeners,
            self.transport,
        )
    }

    /// `forward 127.0.0.1:0:vm1:PORT` — the common single-listener case.
    pub fn forward_to(&self, service_port: u16) -> Forward {
        self.forward(
            &[],
            &[format!("127.0.0.1:0:{}", self.target(service_port))],
            1,
        )
    }

    /// Kills (SIGKILL) the process nearest to the VM that carries the client's bytes: the edge if
    /// there is one, else the agent. Every open forwarded connection must then be reset.
    pub fn kill_carrier(&mut self) {
        if let Some(edge) = self.edge.as_mut() {
            edge.kill();
        } else if let Some(agent) = self.agent.as_mut() {
            agent.kill();
        }
    }
}

/// A running `forward` client and the local addresses it printed.
pub struct Forward {
    pub proc: Proc,
    pub locals: Vec<Local>,
}

impl Forward {
    pub fn start(args: Vec<OsString>, listeners: usize, transport: Transport) -> Forward {
        Forward::start_with(Proc::forward("forward", args), listeners, transport)
    }

    /// Waits for `listeners` forwarding lines of an already spawned `forward`.
    pub fn start_with(mut proc: Proc, listeners: usize, transport: Transport) -> Forward {
        let lines = proc.wait_lines(Src::Stdout, listeners, "`forwarding ...` lines", |l| {
            l.starts_with("forwarding ") || l.starts_with("{\"forwarding\":")
        });
        let locals = lines
            .iter()
            .map(|l| {
                let (local, rest) = if l.starts_with('{') {
                    // `--log-format json`: {"forwarding":{"listen":ADDR,"to":LABEL}}
                    let v: serde_json::Value =
                        serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
                    let f = &v["forwarding"];
                    let field = |k: &str| -> String {
                        f[k].as_str()
                            .unwrap_or_else(|| panic!("no string {k} in {l:?}"))
                            .to_owned()
                    };
                    (field("listen"), field("to"))
                } else {
                    let (a, b) = l
                        .trim_start_matches("forwarding ")
                        .split_once(" -> ")
                        .unwrap_or_else(|| panic!("unexpected line {l:?}"));
                    (a.to_owned(), b.to_owned())
                };
                let (local, rest) = (local.as_str(), rest.as_str());
                assert!(
                    rest.ends_with(&format!("({})", transport.mode_label())),
                    "forwarding line {l:?} should end with ({})",
                    transport.mode_label()
                );
                Local::parse(local).unwrap_or_else(|| panic!("bad local address in {l:?}"))
            })
            .collect();
        Forward { proc, locals }
    }

    pub fn local(&self) -> &Local {
        &self.locals[0]
    }
}

/// Waits for a `forward agent`'s listening line and returns the port it names (the one picked
/// for 0).
pub fn listening_port(agent: &mut Proc) -> u16 {
    let line = agent.wait_line(Src::Stdout, "the agent's listening line", |l| {
        l.contains("listening on")
    });
    line.split_whitespace()
        .find_map(|w| w.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no address in agent line {line:?}"))
        .port()
}
