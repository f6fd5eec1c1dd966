//! The Kafka wire protocol over one TCP connection: size-prefixed frames, a
//! request header with a correlation id, a response header that must echo
//! it, and a deadline on every call. A connection whose call failed in any
//! way (deadline, IO, a frame that does not decode) is left in an unknown
//! state: the caller drops it and connects again.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, FindCoordinatorRequest,
    FindCoordinatorResponse, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, RequestHeader, ResponseHeader,
    SyncGroupRequest, SyncGroupResponse,
};
use kafka_protocol::protocol::{
    encode_request_header_into_buffer, Decodable, Encodable, HeaderVersion, Message, StrBytes,
    VersionRange,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ClusterError;

/// The client id every request carries (brokers log it).
const CLIENT_ID: &str = "kpay";

/// Largest response frame accepted. Group responses carry every member's
/// metadata or one assignment: kilobytes, not megabytes.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// The version of ApiVersions asked first (v3, flexible); a broker that
/// does not know it answers in v0 with the versions it does know.
const API_VERSIONS_VERSION: i16 = 3;

/// A request this module sends, with its API key and the response it gets.
pub trait Request: Message + Encodable {
    /// The API key of the request.
    const KEY: ApiKey;
    /// What the broker answers.
    type Response: Decodable + HeaderVersion;
}

macro_rules! requests {
    ($($request:ty => $response:ty, $key:ident;)*) => {$(
        impl Request for $request {
            const KEY: ApiKey = ApiKey::$key;
            type Response = $response;
        }
    )*};
}

requests! {
    ApiVersionsRequest => ApiVersionsResponse, ApiVersions;
    FindCoordinatorRequest => FindCoordinatorResponse, FindCoordinator;
    JoinGroupRequest => JoinGroupResponse, JoinGroup;
    SyncGroupRequest => SyncGroupResponse, SyncGroup;
    HeartbeatRequest => HeartbeatResponse, Heartbeat;
    LeaveGroupRequest => LeaveGroupResponse, LeaveGroup;
}

/// One connection to one broker.
pub struct Connection {
    stream: TcpStream,
    address: String,
    correlation_id: i32,
    timeout: Duration,
    /// The broker's version range per API key, from ApiVersions.
    versions: Vec<(i16, VersionRange)>,
    /// A call started and has not ended (set while one runs; left set when
    /// one was dropped halfway or failed).
    in_call: bool,
}

impl Connection {
    /// Connects to `address` (`host:port`) and asks which API versions the
    /// broker speaks, all within `timeout`.
    pub async fn open(address: &str, timeout: Duration) -> Result<Self, ClusterError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                return Err(ClusterError::Unavailable(format!(
                    "cannot connect to {address}: {error}"
                )))
            }
            Err(_) => {
                return Err(ClusterError::Unavailable(format!(
                    "cannot connect to {address} within {timeout:?}"
                )))
            }
        };
        // Small frames that wait on each other: no Nagle delay.
        let _ = stream.set_nodelay(true);
        let mut connection = Self {
            stream,
            address: address.to_owned(),
            correlation_id: 0,
            timeout,
            versions: Vec::new(),
            in_call: false,
        };
        connection.versions = connection.api_versions().await?;
        Ok(connection)
    }

    /// The broker this connection talks to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The highest version of request `R` both sides speak within `min..=max`.
    pub fn version<R: Request>(&self, min: i16, max: i16) -> Result<i16, ClusterError> {
        let ours = VersionRange { min, max }.intersect(&R::VERSIONS);
        let theirs = self
            .versions
            .iter()
            .find(|(key, _)| *key == R::KEY as i16)
            .map(|(_, range)| *range)
            .ok_or_else(|| self.unsupported::<R>("the API"))?;
        let both = ours.intersect(&theirs);
        if both.is_empty() {
            return Err(self.unsupported::<R>(&format!("versions {ours} (it has {theirs})")));
        }
        Ok(both.max)
    }

    /// Whether the connection can take a call: not after a call that was
    /// abandoned halfway (its answer may still come).
    pub fn is_usable(&self) -> bool {
        !self.in_call
    }

    fn unsupported<R: Request>(&self, what: &str) -> ClusterError {
        ClusterError::Protocol(format!(
            "broker {} does not support {what} of {:?}",
            self.address,
            R::KEY
        ))
    }

    async fn api_versions(&mut self) -> Result<Vec<(i16, VersionRange)>, ClusterError> {
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str(CLIENT_ID))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let response = self.call(&request, API_VERSIONS_VERSION).await?;
        let keys = if response.error_code == 0 {
            response.api_keys
        } else {
            // UNSUPPORTED_VERSION: the broker answered in v0 with what it knows.
            return Err(ClusterError::Protocol(format!(
                "broker {} refused ApiVersions v{API_VERSIONS_VERSION} (error {})",
                self.address, response.error_code
            )));
        };
        Ok(keys
            .into_iter()
            .map(|k| {
                let range = VersionRange {
                    min: k.min_version,
                    max: k.max_version,
                };
                (k.api_key, range)
            })
            .collect())
    }

    /// Sends `request` as `version` and reads its response, within the
    /// connection's deadline.
    pub async fn call<R: Request>(
        &mut self,
        request: &R,
        version: i16,
    ) -> Result<R::Response, ClusterError> {
        self.call_within(request, version, self.timeout).await
    }

    /// [`Connection::call`] with a deadline of its own (for calls the
    /// coordinator holds, such as JoinGroup).
    pub async fn call_within<R: Request>(
        &mut self,
        request: &R,
        version: i16,
        timeout: Duration,
    ) -> Result<R::Response, ClusterError> {
        if self.in_call {
            return Err(ClusterError::Unavailable(format!(
                "the connection to {} was left halfway through a call",
                self.address
            )));
        }
        self.in_call = true;
        let result = match tokio::time::timeout(timeout, self.exchange(request, version)).await {
            Ok(result) => result,
            Err(_) => Err(ClusterError::Unavailable(format!(
                "{:?} took longer than {timeout:?}",
                R::KEY
            ))),
        };
        // After a failure the stream's position is unknown: keep it unusable.
        self.in_call = result.is_err();
        result
    }

    async fn exchange<R: Request>(
        &mut self,
        request: &R,
        version: i16,
    ) -> Result<R::Response, ClusterError> {
        self.correlation_id = self.correlation_id.wrapping_add(1);
        let correlation_id = self.correlation_id;
        let frame = encode(request, version, correlation_id)?;
        let io = |error: std::io::Error| {
            ClusterError::Unavailable(format!("{:?} to {}: {error}", R::KEY, self.address))
        };
        self.stream.write_all(&frame).await.map_err(io)?;
        let size = self.stream.read_i32().await.map_err(io)?;
        let size = usize::try_from(size)
            .ok()
            .filter(|size| *size <= MAX_RESPONSE_BYTES)
            .ok_or_else(|| {
                ClusterError::Protocol(format!(
                    "response frame of {size} bytes from {}",
                    self.address
                ))
            })?;
        let mut body = vec![0; size];
        self.stream.read_exact(&mut body).await.map_err(io)?;
        decode::<R>(Bytes::from(body), version, correlation_id)
    }
}

/// One request frame: size, header, body.
pub fn encode<R: Request>(
    request: &R,
    version: i16,
    correlation_id: i32,
) -> Result<Bytes, ClusterError> {
    let header = RequestHeader::default()
        .with_request_api_key(R::KEY as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
    let encoding = |error: anyhow::Error| {
        ClusterError::Protocol(format!("encoding {:?} v{version}: {error}", R::KEY))
    };
    let mut frame = BytesMut::new();
    frame.put_i32(0);
    encode_request_header_into_buffer(&mut frame, &header).map_err(encoding)?;
    request.encode(&mut frame, version).map_err(encoding)?;
    let size = i32::try_from(frame.len() - 4)
        .map_err(|_| ClusterError::Protocol("request frame too large".into()))?;
    frame[..4].copy_from_slice(&size.to_be_bytes());
    Ok(frame.freeze())
}

/// A response frame's body (after the size): its header must echo
/// `correlation_id`, and nothing may follow the body.
pub fn decode<R: Request>(
    mut body: Bytes,
    version: i16,
    correlation_id: i32,
) -> Result<R::Response, ClusterError> {
    let decoding = |error: anyhow::Error| {
        ClusterError::Protocol(format!(
            "decoding the {:?} v{version} response: {error}",
            R::KEY
        ))
    };
    let header_version = R::Response::header_version(version);
    let header = ResponseHeader::decode(&mut body, header_version).map_err(decoding)?;
    if header.correlation_id != correlation_id {
        return Err(ClusterError::Protocol(format!(
            "response to request {} answers request {}",
            correlation_id, header.correlation_id
        )));
    }
    let response = R::Response::decode(&mut body, version).map_err(decoding)?;
    if body.has_remaining() {
        tracing::debug!(
            target: "kpay::cluster",
            api = ?R::KEY,
            left = body.remaining(),
            "bytes after a response"
        );
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A request frame starts with the size of what follows, then the API key, version and correlation id.
    #[test]
    fn a_request_frame_is_size_prefixed() {
        let frame = encode(&HeartbeatRequest::default(), 4, 7).unwrap();
        let mut bytes = frame.clone();
        assert_eq!(bytes.get_i32() as usize, frame.len() - 4);
        assert_eq!(bytes.get_i16(), ApiKey::Heartbeat as i16);
        assert_eq!(bytes.get_i16(), 4);
        assert_eq!(bytes.get_i32(), 7);
    }

    // A response decodes when its correlation id matches and is refused when it does not.
    #[test]
    fn a_response_must_answer_its_request() {
        // Heartbeat v0: header (correlation id), body (error code).
        let mut body = BytesMut::new();
        body.put_i32(9);
        body.put_i16(27);
        let body = body.freeze();
        let decoded = decode::<HeartbeatRequest>(body.clone(), 0, 9).unwrap();
        assert_eq!(decoded.error_code, 27);
        let error = decode::<HeartbeatRequest>(body.clone(), 0, 10).unwrap_err();
        assert!(error.to_string().contains("answers request 9"), "{error}");
        let error = decode::<HeartbeatRequest>(body.slice(..5), 0, 9).unwrap_err();
        assert!(matches!(error, ClusterError::Protocol(_)), "{error}");
    }
}
