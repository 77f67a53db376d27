//! A hand-driven protocol peer, for cases a well-behaved frpc never produces.

use std::net::SocketAddr;

use common::{Command, FrameReader, MAX_FRAME, PROTOCOL_VERSION, Registration, write_command};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::WAIT;

/// A control connection driven frame by frame.
pub struct FakeClient {
    /// Frames from frps.
    pub reader: FrameReader<OwnedReadHalf>,
    /// Frames to frps.
    pub writer: OwnedWriteHalf,
}

impl FakeClient {
    /// Connects to the control port.
    pub async fn connect(control: SocketAddr) -> FakeClient {
        FakeClient::over(TcpStream::connect(control).await.expect("connect"))
    }

    /// Connects with a receive buffer of `bytes` (the kernel doubles it),
    /// so that frps's frames fill it soon while they go unread.
    pub async fn connect_receiving_little(control: SocketAddr, bytes: u32) -> FakeClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        FakeClient::over(socket.connect(control).await.expect("connect"))
    }

    fn over(stream: TcpStream) -> FakeClient {
        let (rd, wr) = stream.into_split();
        FakeClient {
            reader: FrameReader::new(rd, MAX_FRAME),
            writer: wr,
        }
    }

    /// Sends one command.
    pub async fn send(&mut self, cmd: Command) {
        write_command(&mut self.writer, &cmd).await.expect("send");
    }

    /// Receives one command (None when frps closed the connection).
    pub async fn recv(&mut self) -> Option<Command> {
        tokio::time::timeout(WAIT, self.reader.read_command())
            .await
            .expect("frame in time")
            .ok()
            .flatten()
    }

    /// Logs in with `token` and registers as `id`; returns frps's answer to the registration.
    pub async fn register(control: SocketAddr, token: &str, id: &str) -> (FakeClient, Command) {
        let registration = Registration {
            client_id: id.into(),
            machine_id: format!("machine-{id}"),
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        };
        FakeClient::register_as(control, token, registration).await
    }

    /// Logs in with `token` and sends `registration` as it is; returns the
    /// connection and frps's answer.
    pub async fn register_as(
        control: SocketAddr,
        token: &str,
        registration: Registration,
    ) -> (FakeClient, Command) {
        FakeClient::connect(control)
            .await
            .log_in_and_register(token, registration)
            .await
    }

    /// Logs in on this connection with `token` and sends `registration`;
    /// returns the connection and frps's answer.
    pub async fn log_in_and_register(
        mut self,
        token: &str,
        registration: Registration,
    ) -> (FakeClient, Command) {
        self.send(Command::LoginToken {
            token: token.into(),
        })
        .await;
        match self.recv().await {
            Some(Command::LoginResult { ok: true, .. }) => {}
            other => {
                return (
                    self,
                    other.unwrap_or(Command::Error {
                        message: "closed".into(),
                    }),
                );
            }
        }
        self.send(Command::Register(registration)).await;
        let answer = self.recv().await.expect("registration answer");
        (self, answer)
    }
}
