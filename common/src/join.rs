//! Joining two byte streams.

use tokio::io::{AsyncRead, AsyncWrite};

/// Copy buffer size for each direction. Chosen so one read usually carries a
/// whole TCP segment burst without holding much memory per idle connection.
pub const JOIN_BUFFER: usize = 64 * 1024;

/// Bytes moved by [`join_streams`] in each direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JoinStats {
    /// Bytes copied from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes copied from `b` to `a`.
    pub b_to_a: u64,
}

/// Copies bytes both ways between `a` and `b` until both directions are done.
///
/// Half-close is preserved: when one side reaches EOF, the other side's write
/// half is shut down, and the opposite direction keeps flowing until it ends
/// too. One side's EOF never cuts data still in flight the other way.
pub async fn join_streams<A, B>(a: &mut A, b: &mut B) -> std::io::Result<JoinStats>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (a_to_b, b_to_a) =
        tokio::io::copy_bidirectional_with_sizes(a, b, JOIN_BUFFER, JOIN_BUFFER).await?;
    Ok(JoinStats { a_to_b, b_to_a })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn half_close_keeps_the_other_direction() {
        // a <-> (a_peer ... b_peer) <-> b
        let (mut a, mut a_peer) = duplex(16);
        let (mut b, mut b_peer) = duplex(16);
        let join = tokio::spawn(async move { join_streams(&mut a_peer, &mut b_peer).await });

        // a sends a request and closes its write half.
        a.write_all(b"request").await.unwrap();
        a.shutdown().await.unwrap();

        // b reads the request to EOF, then answers *after* a's EOF.
        let mut req = Vec::new();
        b.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        let answer = vec![7u8; 100_000];
        let writer = {
            let answer = answer.clone();
            tokio::spawn(async move {
                b.write_all(&answer).await.unwrap();
                b.shutdown().await.unwrap();
            })
        };
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, answer);
        writer.await.unwrap();
        let stats = join.await.unwrap().unwrap();
        assert_eq!(
            stats,
            JoinStats {
                a_to_b: 7,
                b_to_a: 100_000
            }
        );
    }
}
