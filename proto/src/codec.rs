//! The protobuf codec of the generated server and client: prost's, except that a *request* the
//! server cannot decode (malformed protobuf, a string field that is not UTF-8) is the client's
//! mistake — INVALID_ARGUMENT, with prost's message naming the message and field — instead of
//! INTERNAL. A response a client cannot decode stays INTERNAL.

use crate::v1;
use std::sync::OnceLock;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Which side of an RPC a message type travels on.
pub trait WireMessage {
    /// Sent by clients (decoded by the server).
    const IS_REQUEST: bool;
}

macro_rules! wire {
    ($request:expr => $($t:ty),*) => { $(impl WireMessage for $t { const IS_REQUEST: bool = $request; })* };
}
wire!(true => v1::GenerateRequest, v1::GetJobRequest, v1::WatchJobRequest, v1::CancelJobRequest, v1::ListModelsRequest, v1::ListLorasRequest);
wire!(false => v1::Job, v1::JobEvent, v1::ListModelsResponse, v1::ListLorasResponse);

/// Names of the request types above, for the test that checks them against the contract.
pub const REQUEST_TYPES: &[&str] = &[
    "GenerateRequest",
    "GetJobRequest",
    "WatchJobRequest",
    "CancelJobRequest",
    "ListModelsRequest",
    "ListLorasRequest",
];

/// The largest request message this process accepts, and the setting that sizes it.
static REQUEST_LIMIT: OnceLock<(usize, String)> = OnceLock::new();

/// Sets the largest request message the server decodes (once, at start-up); a larger one is
/// RESOURCE_EXHAUSTED with a message giving its size, the limit and `setting` (what sizes
/// it). Keep the transport's own limit above this one, so the message is ours.
pub fn set_request_limit(bytes: usize, setting: &str) {
    let _ = REQUEST_LIMIT.set((bytes, setting.to_string()));
}

/// The refusal of a request message of `len` bytes, if it is over the limit.
fn over_limit(len: usize) -> Option<Status> {
    let (limit, setting) = REQUEST_LIMIT.get()?;
    (len > *limit).then(|| {
        Status::resource_exhausted(format!(
            "invalid request: the message is {len} bytes, over this server's limit of {limit} \
             bytes ({setting})"
        ))
    })
}

/// [`tonic_prost::ProstCodec`] with request decode errors mapped to INVALID_ARGUMENT.
#[derive(Debug)]
pub struct ArgumentCodec<T, U>(tonic_prost::ProstCodec<T, U>);

impl<T, U> Default for ArgumentCodec<T, U> {
    fn default() -> Self {
        Self(tonic_prost::ProstCodec::default())
    }
}

impl<T, U> Codec for ArgumentCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + WireMessage + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ArgumentDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ArgumentDecoder(self.0.decoder())
    }
}

/// Decodes with prost; a request that fails is INVALID_ARGUMENT.
#[derive(Debug)]
pub struct ArgumentDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default + WireMessage> Decoder for ArgumentDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if U::IS_REQUEST {
            if let Some(refused) = over_limit(prost::bytes::Buf::remaining(buf)) {
                return Err(refused);
            }
        }
        self.0.decode(buf).map_err(|s| {
            if U::IS_REQUEST {
                Status::invalid_argument(format!(
                    "invalid request: malformed protobuf ({})",
                    s.message()
                ))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
