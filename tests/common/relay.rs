//! A TCP relay on `127.0.0.1:0` that forwards to one target (Postgres, NATS) and lets a test
//! break the network between a process and that target: `freeze` (nothing forwarded, both sockets
//! kept open), `black_hole` (the same, and no close is ever passed on: a host that died or was
//! cut off without a FIN), `reset` (both sides closed with RST) and `heal` (forward again, held
//! bytes first). Controls apply to every connection at once, or to one (`connections`).
//!
//! The relay's own kernel still ACKs every byte and keepalive probe it receives, so to TCP a
//! black-holed peer looks alive for ever: only an expiring lease can tell that it is gone. That is
//! the point of it. Every task is owned by the relay and aborted when it is dropped (which closes
//! whatever it still holds).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What a link does with bytes and closes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Frozen,
    BlackHole,
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LinkState {
    fault: Fault,
    /// Once black-holed, a peer's close is never passed on, also after `heal`.
    swallow_closes: bool,
}

impl LinkState {
    const FORWARDING: LinkState = LinkState {
        fault: Fault::None,
        swallow_closes: false,
    };

    fn apply(&mut self, fault: Fault) {
        self.fault = fault;
        if fault == Fault::BlackHole {
            self.swallow_closes = true;
        }
    }
}

/// Controls one relayed connection.
#[derive(Clone)]
pub struct Connection(Arc<watch::Sender<LinkState>>);

impl Connection {
    pub fn freeze(&self) {
        self.0.send_modify(|s| s.apply(Fault::Frozen));
    }
    pub fn black_hole(&self) {
        self.0.send_modify(|s| s.apply(Fault::BlackHole));
    }
    pub fn reset(&self) {
        self.0.send_modify(|s| s.apply(Fault::Reset));
    }
    pub fn heal(&self) {
        self.0.send_modify(|s| {
            if s.fault != Fault::Reset {
                s.fault = Fault::None;
            }
        });
    }
    fn is_open(&self) -> bool {
        self.0.receiver_count() > 0
    }
}

struct Shared {
    /// The state new connections start in.
    default: Mutex<LinkState>,
    connections: Mutex<Vec<Connection>>,
    tasks: Mutex<JoinSet<()>>,
}

pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Relay {
    /// Listens on `127.0.0.1:0` and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay binds");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            default: Mutex::new(LinkState::FORWARDING),
            connections: Mutex::new(Vec::new()),
            tasks: Mutex::new(JoinSet::new()),
        });
        let accepting = Arc::downgrade(&shared);
        shared.tasks.lock().unwrap().spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Some(shared) = accepting.upgrade() else {
                    return;
                };
                let state = *shared.default.lock().unwrap();
                let (tx, rx) = watch::channel(state);
                shared
                    .connections
                    .lock()
                    .unwrap()
                    .push(Connection(Arc::new(tx)));
                shared
                    .tasks
                    .lock()
                    .unwrap()
                    .spawn(relay_connection(client, target, rx));
            }
        });
        Relay { addr, shared }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The connections still open (in either direction), oldest first.
    pub fn connections(&self) -> Vec<Connection> {
        let mut all = self.shared.connections.lock().unwrap();
        all.retain(Connection::is_open);
        all.clone()
    }

    fn apply(&self, fault: Fault, default: impl FnOnce(&mut LinkState)) {
        default(&mut self.shared.default.lock().unwrap());
        for c in self.connections() {
            match fault {
                Fault::None => c.heal(),
                f => c.0.send_modify(|s| s.apply(f)),
            }
        }
    }

    /// Stops forwarding in both directions, on every connection and on new ones (they wait),
    /// keeping every socket open; bytes and closes are held until `heal`.
    pub fn freeze(&self) {
        self.apply(Fault::Frozen, |d| d.apply(Fault::Frozen));
    }

    /// Forwards nothing and closes nothing: when the client process dies, its close is not passed
    /// on, so the server keeps the session (a host gone without a FIN). New connections are
    /// accepted and left hanging. `heal` lets bytes through again (a partition that heals), but
    /// a close seen by a black-holed connection is never passed on.
    pub fn black_hole(&self) {
        self.apply(Fault::BlackHole, |d| d.apply(Fault::BlackHole));
    }

    /// Closes both sides of every open connection with RST (SO_LINGER 0); new connections are
    /// forwarded (a connection-resetting blip, not a lasting fault).
    pub fn reset(&self) {
        self.apply(Fault::Reset, |d| *d = LinkState::FORWARDING);
    }

    /// Forwards again after `freeze` or `black_hole`, held bytes first.
    pub fn heal(&self) {
        self.apply(Fault::None, |d| d.fault = Fault::None);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.tasks.lock().unwrap().abort_all();
    }
}

/// One link's view of its state.
struct Link(watch::Receiver<LinkState>);

impl Link {
    /// Waits until the link forwards; false once it is reset (or the relay is gone).
    async fn forwarding(&mut self) -> bool {
        loop {
            match self.0.borrow_and_update().fault {
                Fault::None => return true,
                Fault::Reset => return false,
                Fault::Frozen | Fault::BlackHole => {}
            }
            if self.0.changed().await.is_err() {
                return false;
            }
        }
    }

    /// Resolves when the link is reset (or the relay is gone).
    async fn reset(&mut self) {
        loop {
            if self.0.borrow_and_update().fault == Fault::Reset || self.0.changed().await.is_err() {
                return;
            }
        }
    }

    fn swallows_closes(&self) -> bool {
        self.0.borrow().swallow_closes
    }
}

async fn relay_connection(client: TcpStream, target: SocketAddr, rx: watch::Receiver<LinkState>) {
    let mut link = Link(rx.clone());
    // a connection opened while the network is down waits like a SYN nobody answers
    if !link.forwarding().await {
        let _ = client.set_zero_linger();
        return;
    }
    let server = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(_) => {
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, Link(rx.clone())),
        pump(server_read, client_write, Link(rx)),
    );
}

/// Forwards one direction while the link forwards; holds bytes (and closes) while it does not.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut link: Link) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !link.forwarding().await {
            return abort(from, to);
        }
        let read = tokio::select! {
            biased;
            changed = link.0.changed() => {
                if changed.is_err() {
                    return abort(from, to);
                }
                continue;
            }
            r = from.read(&mut buf) => r,
        };
        let n = match read {
            Ok(n) if n > 0 => n,
            end => {
                // the peer closed (FIN) or failed (RST): a black hole passes on neither
                if link.swallows_closes() {
                    link.reset().await;
                    return abort(from, to);
                }
                if !link.forwarding().await || link.swallows_closes() {
                    link.reset().await;
                    return abort(from, to);
                }
                match end {
                    Ok(_) => {
                        // a FIN: half-close; the socket closes once the other direction ends
                        let _ = to.shutdown().await;
                        return;
                    }
                    Err(_) => return abort(from, to),
                }
            }
        };
        // bytes read just before a freeze are held with the rest
        if !link.forwarding().await {
            return abort(from, to);
        }
        let written = tokio::select! {
            w = to.write_all(&buf[..n]) => w,
            () = link.reset() => return abort(from, to),
        };
        if written.is_err() {
            return abort(from, to);
        }
    }
}

/// Closes both sockets with RST once both directions let go of them.
fn abort(from: OwnedReadHalf, to: OwnedWriteHalf) {
    let _ = from.as_ref().set_zero_linger();
    let _ = to.as_ref().set_zero_linger();
    // no FIN before the RST
    to.forget();
}
