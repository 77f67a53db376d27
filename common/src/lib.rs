//! The frpx wire protocol, shared by frps and frpc.
//!
//! - [`protocol`]: the [`Command`] enum, every message of the conversation.
//! - [`codec`]: length-prefixed JSON framing with a size limit and timeouts.
//! - [`hex`]: lower-case hexadecimal.
//! - [`join`]: bidirectional stream joining with half-close semantics.
//! - [`stream`]: the connection type, plain TCP or TLS.
//! - [`config_file`]: INI configuration files feeding the binaries' flags.
//! - [`telemetry`]: the binaries' log set-up.
//! - [`text`]: peers' text cut and tamed for echoing and logging.
//! - [`mux`]: many byte streams over one frps-frpc connection.
//! - [`memory`]: allocator tuning so freed large blocks leave RSS.
//! - [`pace`]: one event per interval.
//! - [`process`]: signals and the open-file limit.
//! - [`private_file`]: files only their owner may read, written atomically.
//! - `testing` (feature `testing`): helpers for the binaries' unit tests.

pub mod codec;
pub mod config_file;
pub mod duration;
pub mod hex;
pub mod join;
pub mod memory;
pub mod mux;
pub mod pace;
pub mod private_file;
pub mod process;
pub mod protocol;
pub mod stream;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod text;

pub use codec::{FrameError, FrameReader, MAX_FRAME, read_one_command, write_command};
pub use duration::{parse_duration, parse_duration_checked, parse_positive_duration};
pub use join::{GONE_CHECK, JoinStats, SenderGone, join_streams, join_streams_lingering};
pub use protocol::{
    Command, DiskInfo, GpuInfo, MAX_MODEL_NAME, MAX_MODELS, ModelInfo, PROTOCOL_VERSION,
    Registration, SystemInfo, keep_named_models, model_name_kept,
};
pub use stream::Stream;
