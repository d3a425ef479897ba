//! A TCP target that drops SYNs: a listener whose accept queue is full. A dial to it waits,
//! retransmitting, and connects once room appears, which shows whether a dial was abandoned.

use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A listener on 127.0.0.1 with its accept queue full, and the connections that fill it.
pub async fn full_listener() -> (TcpListener, Vec<TcpStream>) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let target = sock.listen(1).unwrap();
    let port = target.local_addr().unwrap().port();
    let mut fillers = Vec::new();
    while let Ok(Ok(s)) = tokio::time::timeout(
        Duration::from_millis(300),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    {
        fillers.push(s);
        assert!(fillers.len() < 64, "the accept queue never filled");
    }
    (target, fillers)
}

/// Empties the queue, then asserts that no connection arrives within the SYN retransmissions
/// at 1 s and 3 s: a dial still running would connect by then.
pub async fn assert_no_late_connection(target: &TcpListener) {
    let mut queued = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), target.accept()).await {
        queued += 1;
    }
    assert!(queued >= 1, "the filler connections were queued");
    let late = tokio::time::timeout(Duration::from_secs(4), target.accept()).await;
    assert!(
        late.is_err(),
        "the target got a connection for a stream the client had reset"
    );
}
