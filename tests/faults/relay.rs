//! The fault relay itself (`common::relay`): bytes flow; a frozen relay forwards nothing until
//! healed; a reset reaches both peers as a connection reset; a black-holed client's death is
//! never passed on to the server.

use std::io::ErrorKind;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::relay::Relay;

/// How long "nothing arrives" is watched for: a negative can only be observed over a window.
const QUIET: Duration = Duration::from_millis(400);
const DEADLINE: Duration = Duration::from_secs(5);

/// A server, a relay in front of it, and one relayed connection: (relay, client, server side).
async fn relayed_pair() -> (Relay, TcpStream, TcpStream) {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = Relay::start(server.local_addr().unwrap()).await;
    let client = TcpStream::connect(relay.addr()).await.unwrap();
    let (accepted, _) = tokio::time::timeout(DEADLINE, server.accept())
        .await
        .expect("the relay connects to the server")
        .unwrap();
    (relay, client, accepted)
}

async fn read_exact_in_time(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("bytes arrive in time")
        .unwrap();
    buf
}

async fn nothing_arrives(s: &mut TcpStream) {
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(QUIET, s.read(&mut buf)).await;
    assert!(r.is_err(), "expected silence, got {r:?}");
}

#[tokio::test]
async fn relay_forwards_bytes_both_ways() {
    let (_relay, mut client, mut server) = relayed_pair().await;
    client.write_all(b"ping").await.unwrap();
    assert_eq!(read_exact_in_time(&mut server, 4).await, b"ping");
    server.write_all(b"pong").await.unwrap();
    assert_eq!(read_exact_in_time(&mut client, 4).await, b"pong");
}

#[tokio::test]
async fn a_frozen_relay_forwards_nothing_until_healed() {
    let (relay, mut client, mut server) = relayed_pair().await;
    relay.freeze();
    client.write_all(b"held").await.unwrap();
    server.write_all(b"also").await.unwrap();
    nothing_arrives(&mut server).await;
    nothing_arrives(&mut client).await;
    relay.heal();
    assert_eq!(read_exact_in_time(&mut server, 4).await, b"held");
    assert_eq!(read_exact_in_time(&mut client, 4).await, b"also");
}

#[tokio::test]
async fn a_reset_reaches_both_peers_as_a_connection_reset() {
    let (relay, mut client, mut server) = relayed_pair().await;
    client.write_all(b"x").await.unwrap();
    read_exact_in_time(&mut server, 1).await;
    relay.reset();
    for side in [&mut client, &mut server] {
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(DEADLINE, side.read(&mut buf))
            .await
            .expect("the reset arrives");
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(ErrorKind::ConnectionReset),
            "a reset, not a clean close"
        );
    }
}

#[tokio::test]
async fn a_black_holed_clients_death_never_reaches_the_server() {
    // control: without a fault, the client's close reaches the server as an end of stream
    let (_relay, client, mut server) = relayed_pair().await;
    drop(client);
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(DEADLINE, server.read(&mut buf))
        .await
        .expect("the close is passed on")
        .unwrap();
    assert_eq!(n, 0);

    let (relay, client, mut server) = relayed_pair().await;
    relay.black_hole();
    drop(client);
    nothing_arrives(&mut server).await;
    // the server can still write: the relay's kernel accepts it, as a live host's would
    server.write_all(b"anyone?").await.unwrap();
    nothing_arrives(&mut server).await;
    // and a partition that heals does not bring the lost close back either
    relay.heal();
    nothing_arrives(&mut server).await;
}
