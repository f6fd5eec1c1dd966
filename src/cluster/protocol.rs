//! What kpay members say through the group coordinator: the requests of the
//! classic group protocol, built for the version the broker speaks; the
//! bytes of a member's join metadata and of the membership the leader hands
//! out (small JSON documents with a format version); and what each error
//! code means for a member.
//!
//! Readers ignore fields they do not know, so a later format may add some;
//! a change that older members cannot read needs a new protocol name.

use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::find_coordinator_response::FindCoordinatorResponse;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    FindCoordinatorRequest, GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest,
    SyncGroupRequest,
};
use kafka_protocol::protocol::StrBytes;
use serde::{Deserialize, Serialize};

use super::{ClusterError, MemberConfig, MemberView};

/// The group's protocol type (as Kafka Connect's is `connect`).
pub const PROTOCOL_TYPE: &str = "kpay";

/// The one assignment protocol kpay members speak.
pub const PROTOCOL_NAME: &str = "sticky";

/// The format of the metadata and membership documents written now.
pub const FORMAT_VERSION: u16 = 1;

/// Largest metadata or membership document read (256 partitions and a few
/// dozen members take a few kilobytes).
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// Highest version of each request this module sends; the broker's own
/// highest one is used when lower. Join needs v4 (MEMBER_ID_REQUIRED) and
/// LeaveGroup v3 (members by identity), which every broker since Kafka 2.3 has.
pub mod versions {
    pub const FIND_COORDINATOR: i16 = 4;
    pub const JOIN_GROUP: i16 = 9;
    pub const JOIN_GROUP_MIN: i16 = 4;
    pub const SYNC_GROUP: i16 = 5;
    pub const HEARTBEAT: i16 = 4;
    pub const LEAVE_GROUP: i16 = 5;
    pub const LEAVE_GROUP_MIN: i16 = 3;
}

/// `key_type` of a group in FindCoordinator.
const KEY_TYPE_GROUP: i8 = 0;

/// What a member tells the leader when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinMetadata {
    /// The format version.
    pub version: u16,
    /// The member's HTTP URL.
    pub url: String,
    /// The generation of the partitions below (-1: none yet).
    pub generation: i32,
    /// The partitions the member owned in `generation` and has released.
    pub owned: Vec<u32>,
}

/// The membership of one generation, as the leader hands it to every member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The format version.
    pub version: u16,
    /// The generation it is for.
    pub generation: i32,
    /// Every member, by id, with its URL and partitions.
    pub members: Vec<MemberView>,
}

/// A document as bytes.
pub fn encode<T: Serialize>(document: &T) -> Result<Bytes, ClusterError> {
    serde_json::to_vec(document)
        .map(Bytes::from)
        .map_err(|error| ClusterError::Protocol(format!("encoding: {error}")))
}

/// A document from bytes, within the size bound.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ClusterError> {
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(ClusterError::Protocol(format!(
            "a document of {} bytes (at most {MAX_DOCUMENT_BYTES})",
            bytes.len()
        )));
    }
    serde_json::from_slice(bytes).map_err(|error| ClusterError::Protocol(format!("{error}")))
}

/// A duration in the protocol's 32-bit milliseconds.
pub fn millis(duration: Duration) -> Option<i32> {
    i32::try_from(duration.as_millis()).ok()
}

fn text(value: &str) -> StrBytes {
    StrBytes::from_string(value.to_owned())
}

fn group(config: &MemberConfig) -> GroupId {
    GroupId(text(&config.group))
}

/// FindCoordinator for the group (one key up to v3, a list of keys from v4).
pub fn find_coordinator(config: &MemberConfig, version: i16) -> FindCoordinatorRequest {
    let request = if version >= 4 {
        FindCoordinatorRequest::default().with_coordinator_keys(vec![text(&config.group)])
    } else {
        FindCoordinatorRequest::default().with_key(text(&config.group))
    };
    request.with_key_type(KEY_TYPE_GROUP)
}

/// The coordinator's `host:port` from a FindCoordinator answer.
pub fn coordinator_address(
    response: &FindCoordinatorResponse,
    version: i16,
) -> Result<String, ClusterError> {
    let (code, host, port) = match response.coordinators.first() {
        Some(c) if version >= 4 => (c.error_code, &c.host, c.port),
        None if version >= 4 => {
            return Err(ClusterError::Protocol(
                "FindCoordinator answered no coordinator".into(),
            ))
        }
        _ => (response.error_code, &response.host, response.port),
    };
    refused("FindCoordinator", code)?;
    Ok(format!("{}:{port}", host.as_str()))
}

/// JoinGroup with this member's metadata.
pub fn join_group(
    config: &MemberConfig,
    member_id: &str,
    metadata: Bytes,
    version: i16,
) -> JoinGroupRequest {
    let protocol = JoinGroupRequestProtocol::default()
        .with_name(text(PROTOCOL_NAME))
        .with_metadata(metadata);
    let request = JoinGroupRequest::default()
        .with_group_id(group(config))
        .with_session_timeout_ms(millis(config.session_timeout).unwrap_or(i32::MAX))
        .with_rebalance_timeout_ms(millis(config.rebalance_timeout).unwrap_or(i32::MAX))
        .with_member_id(text(member_id))
        .with_protocol_type(text(PROTOCOL_TYPE))
        .with_protocols(vec![protocol]);
    if version >= 8 {
        request.with_reason(Some(text("kpay member joining")))
    } else {
        request
    }
}

/// SyncGroup: the leader's assignments (member id, bytes), or none.
pub fn sync_group(
    config: &MemberConfig,
    generation: i32,
    member_id: &str,
    assignments: Vec<(String, Bytes)>,
    version: i16,
) -> SyncGroupRequest {
    let assignments = assignments
        .into_iter()
        .map(|(id, bytes)| {
            SyncGroupRequestAssignment::default()
                .with_member_id(StrBytes::from_string(id))
                .with_assignment(bytes)
        })
        .collect();
    let request = SyncGroupRequest::default()
        .with_group_id(group(config))
        .with_generation_id(generation)
        .with_member_id(text(member_id))
        .with_assignments(assignments);
    if version >= 5 {
        request
            .with_protocol_type(Some(text(PROTOCOL_TYPE)))
            .with_protocol_name(Some(text(PROTOCOL_NAME)))
    } else {
        request
    }
}

/// Heartbeat for a generation.
pub fn heartbeat(config: &MemberConfig, generation: i32, member_id: &str) -> HeartbeatRequest {
    HeartbeatRequest::default()
        .with_group_id(group(config))
        .with_generation_id(generation)
        .with_member_id(text(member_id))
}

/// LeaveGroup for this member (by identity, v3 and later).
pub fn leave_group(config: &MemberConfig, member_id: &str, version: i16) -> LeaveGroupRequest {
    let identity = MemberIdentity::default().with_member_id(text(member_id));
    let identity = if version >= 5 {
        identity.with_reason(Some(text("kpay shutting down")))
    } else {
        identity
    };
    LeaveGroupRequest::default()
        .with_group_id(group(config))
        .with_members(vec![identity])
}

/// `Ok` for error code 0, else the error as refused by `call`.
pub fn refused(call: &'static str, code: i16) -> Result<(), ClusterError> {
    match ResponseError::try_from_code(code) {
        None => Ok(()),
        Some(error) => Err(ClusterError::Refused { call, error }),
    }
}

/// What a member does about an error of the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// The group rebalances: release, then rejoin with the same member id.
    Rejoin,
    /// The coordinator no longer counts this member (dropped, or its
    /// generation is gone): stop at once, then rejoin as a new member.
    Fenced,
    /// The coordinator moved or is not ready: find it again, after a pause.
    Rediscover,
    /// Retrying cannot help (the group belongs to another protocol, the
    /// broker refuses our settings or our rights): stop.
    Fatal,
}

/// The reaction to an error answered by the coordinator.
pub fn reaction(error: ResponseError) -> Reaction {
    use ResponseError as E;
    match error {
        E::RebalanceInProgress => Reaction::Rejoin,
        E::IllegalGeneration | E::UnknownMemberId | E::FencedInstanceId => Reaction::Fenced,
        E::InconsistentGroupProtocol
        | E::InvalidSessionTimeout
        | E::GroupAuthorizationFailed
        | E::InvalidGroupId
        | E::GroupMaxSizeReached
        | E::UnsupportedVersion => Reaction::Fatal,
        // NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE, COORDINATOR_LOAD_IN_PROGRESS,
        // and whatever else: retry with a fresh coordinator.
        _ => Reaction::Rediscover,
    }
}

/// The reaction to a failed call: refusals by their code, the rest (IO,
/// deadlines, frames that do not decode) by finding the coordinator again.
pub fn reaction_to(error: &ClusterError) -> Reaction {
    match error {
        ClusterError::Refused { error, .. } => reaction(*error),
        ClusterError::Config(_) => Reaction::Fatal,
        _ => Reaction::Rediscover,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Metadata and membership survive the round trip, unknown fields are ignored, and oversized documents are refused.
    #[test]
    fn documents_round_trip() {
        let metadata = JoinMetadata {
            version: FORMAT_VERSION,
            url: "http://10.0.0.1:8080".into(),
            generation: 7,
            owned: vec![1, 5],
        };
        let back: JoinMetadata = decode(&encode(&metadata).unwrap()).unwrap();
        assert_eq!(back, metadata);
        let later = br#"{"version":2,"url":"u","generation":1,"owned":[],"zone":"b"}"#;
        assert_eq!(decode::<JoinMetadata>(later).unwrap().url, "u");
        assert!(decode::<JoinMetadata>(b"{").is_err());
        let huge = vec![b' '; MAX_DOCUMENT_BYTES + 1];
        assert!(decode::<Membership>(&huge).is_err());
    }

    // Each error code of the group protocol leads to the reaction the module documents.
    #[test]
    fn error_codes_map_to_reactions() {
        use ResponseError as E;
        assert_eq!(reaction(E::RebalanceInProgress), Reaction::Rejoin);
        for fenced in [
            E::IllegalGeneration,
            E::UnknownMemberId,
            E::FencedInstanceId,
        ] {
            assert_eq!(reaction(fenced), Reaction::Fenced, "{fenced:?}");
        }
        for moved in [
            E::NotCoordinator,
            E::CoordinatorNotAvailable,
            E::CoordinatorLoadInProgress,
            E::UnknownServerError,
        ] {
            assert_eq!(reaction(moved), Reaction::Rediscover, "{moved:?}");
        }
        assert_eq!(reaction(E::InconsistentGroupProtocol), Reaction::Fatal);
        let timeout = ClusterError::Unavailable("slow".into());
        assert_eq!(reaction_to(&timeout), Reaction::Rediscover);
        assert!(refused("Heartbeat", 0).is_ok());
        let error = refused("Heartbeat", 27).unwrap_err();
        assert_eq!(reaction_to(&error), Reaction::Rejoin);
    }

    // Requests carry only the fields their version has (the encoder refuses others).
    #[test]
    fn requests_fit_every_version() {
        use kafka_protocol::protocol::{Encodable, Message};
        let config = MemberConfig {
            brokers: vec!["127.0.0.1:9092".into()],
            group: "g".into(),
            url: "http://127.0.0.1:8080".into(),
            partitions: 8,
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            rebalance_timeout: Duration::from_secs(30),
            call_timeout: Duration::from_secs(5),
        };
        let mut buffer = bytes::BytesMut::new();
        for v in 0..=FindCoordinatorRequest::VERSIONS
            .max
            .min(versions::FIND_COORDINATOR)
        {
            find_coordinator(&config, v).encode(&mut buffer, v).unwrap();
        }
        for v in versions::JOIN_GROUP_MIN..=versions::JOIN_GROUP {
            let request = join_group(&config, "m", Bytes::new(), v);
            request.encode(&mut buffer, v).unwrap();
        }
        for v in 0..=versions::SYNC_GROUP {
            let assignments = vec![("m".to_owned(), Bytes::from_static(b"{}"))];
            let request = sync_group(&config, 1, "m", assignments, v);
            request.encode(&mut buffer, v).unwrap();
        }
        for v in 0..=versions::HEARTBEAT {
            heartbeat(&config, 1, "m").encode(&mut buffer, v).unwrap();
        }
        for v in versions::LEAVE_GROUP_MIN..=versions::LEAVE_GROUP {
            leave_group(&config, "m", v).encode(&mut buffer, v).unwrap();
        }
    }
}
