//! Peer RPC server: accept loop and per-connection request dispatch.

use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::network::{read_frame_bytes, write_frame, ProposeRejection, RpcRequest, RpcResponse};
use super::{wait_stopped, Inner};

/// Accepts peer connections until `shutdown` flips to true. Connection tasks live in a
/// `JoinSet`, so they are aborted when this task ends or is aborted.
pub(crate) async fn serve(
    listener: TcpListener,
    inner: Arc<Inner>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = wait_stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    let inner = inner.clone();
                    conns.spawn(async move {
                        if let Err(e) = handle_conn(stream, inner).await {
                            tracing::debug!(%remote, error = %e, "watchdog peer connection closed with error");
                        }
                    });
                }
                Err(e) => {
                    // E.g. EMFILE: don't spin.
                    tracing::warn!(error = %e, "watchdog accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
}

async fn handle_conn(mut stream: TcpStream, inner: Arc<Inner>) -> std::io::Result<()> {
    loop {
        let Some(body) = read_frame_bytes(&mut stream).await? else {
            return Ok(());
        };
        // Framing is intact even if the body does not decode, so answer with an error
        // instead of dropping the connection.
        let resp = match serde_json::from_slice::<RpcRequest>(&body) {
            Ok(req) => dispatch(&inner, req).await,
            Err(e) => RpcResponse::Error(format!("cannot decode request: {e}")),
        };
        write_frame(&mut stream, &resp).await?;
    }
}

async fn dispatch(inner: &Inner, req: RpcRequest) -> RpcResponse {
    match req {
        RpcRequest::AppendEntries(rpc) => {
            if let Some(from) = rpc.vote.leader_id().voted_for() {
                inner.peers.record_heard(from);
            }
            RpcResponse::AppendEntries(inner.raft.append_entries(rpc).await)
        }
        RpcRequest::Vote(rpc) => {
            if let Some(from) = rpc.vote.leader_id().voted_for() {
                inner.peers.record_heard(from);
            }
            RpcResponse::Vote(inner.raft.vote(rpc).await)
        }
        RpcRequest::InstallSnapshot(rpc) => {
            if let Some(from) = rpc.vote.leader_id().voted_for() {
                inner.peers.record_heard(from);
            }
            RpcResponse::InstallSnapshot(inner.raft.install_snapshot(rpc).await)
        }
        RpcRequest::Status => RpcResponse::Status(Box::new(inner.status())),
        RpcRequest::Propose(cmd) => {
            // Only commit locally; never forward again (avoids forwarding loops).
            match tokio::time::timeout(inner.control_timeout, inner.raft.client_write(cmd)).await {
                Ok(Ok(resp)) => RpcResponse::Propose(Ok(resp.data)),
                Ok(Err(e)) => match e.forward_to_leader::<BasicNode>() {
                    Some(f) => RpcResponse::Propose(Err(ProposeRejection::NotLeader {
                        leader: f.leader_id,
                    })),
                    None => RpcResponse::Propose(Err(ProposeRejection::Failed(e.to_string()))),
                },
                Err(_) => RpcResponse::Propose(Err(ProposeRejection::Failed(format!(
                    "not committed within {:?}",
                    inner.control_timeout
                )))),
            }
        }
    }
}
