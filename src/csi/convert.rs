//! Proto → domain conversions with validation: each error names the request field.

use tonic::Status;

use crate::csi::v1 as pb;
use crate::model::{AccessMode, AccessType, Capability, DEFAULT_FS};

/// Filesystems Palisade formats and mounts.
pub const SUPPORTED_FS: &[&str] = &["ext4", "xfs"];

/// A required string field: non-empty, or INVALID_ARGUMENT naming it.
pub fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// A volume id as Palisade makes them: no path separators, bounded length.
pub fn volume_id<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    required(value, field)?;
    if value.len() > 128
        || value.contains('/')
        || value.contains('\0')
        || value == "."
        || value == ".."
    {
        return Err(Status::not_found(format!(
            "{field}: no volume has id {value:?}"
        )));
    }
    Ok(value)
}

fn access_mode(
    mode: Option<&pb::volume_capability::AccessMode>,
    field: &str,
) -> Result<AccessMode, Status> {
    use pb::volume_capability::access_mode::Mode;
    let raw = mode
        .ok_or_else(|| Status::invalid_argument(format!("{field}.access_mode is required")))?
        .mode;
    let mode = Mode::try_from(raw).map_err(|_| {
        Status::invalid_argument(format!("{field}.access_mode: unknown mode {raw}"))
    })?;
    Ok(match mode {
        Mode::Unknown => {
            return Err(Status::invalid_argument(format!(
                "{field}.access_mode: mode UNKNOWN is not an access mode"
            )))
        }
        Mode::SingleNodeWriter => AccessMode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly => AccessMode::SingleNodeReaderOnly,
        Mode::MultiNodeReaderOnly => AccessMode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter => AccessMode::MultiNodeSingleWriter,
        Mode::MultiNodeMultiWriter => AccessMode::MultiNodeMultiWriter,
        Mode::SingleNodeSingleWriter => AccessMode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter => AccessMode::SingleNodeMultiWriter,
    })
}

/// Converts and validates one capability.
pub fn capability(cap: &pb::VolumeCapability, field: &str) -> Result<Capability, Status> {
    use pb::volume_capability::AccessType as Pat;
    let access_type = match &cap.access_type {
        None => {
            return Err(Status::invalid_argument(format!(
                "{field}.access_type is required (block or mount)"
            )))
        }
        Some(Pat::Block(_)) => AccessType::Block,
        Some(Pat::Mount(m)) => {
            let fs_type = if m.fs_type.is_empty() {
                DEFAULT_FS.to_string()
            } else {
                m.fs_type.clone()
            };
            if !SUPPORTED_FS.contains(&fs_type.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "{field}.mount.fs_type: {:?} is not supported; supported: {}",
                    m.fs_type,
                    SUPPORTED_FS.join(", ")
                )));
            }
            if !m.volume_mount_group.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "{field}.mount.volume_mount_group is not supported (the plugin does not advertise VOLUME_MOUNT_GROUP)"
                )));
            }
            for flag in &m.mount_flags {
                if flag.is_empty() || flag.contains('\0') {
                    return Err(Status::invalid_argument(format!(
                        "{field}.mount.mount_flags: {flag:?} is not a mount option"
                    )));
                }
            }
            AccessType::Mount {
                fs_type,
                mount_flags: m.mount_flags.clone(),
            }
        }
    };
    Ok(Capability {
        access_type,
        access_mode: access_mode(cap.access_mode.as_ref(), field)?,
    })
}

/// Converts a list of capabilities; the list must not be empty.
pub fn capabilities(caps: &[pb::VolumeCapability], field: &str) -> Result<Vec<Capability>, Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    caps.iter()
        .enumerate()
        .map(|(i, c)| capability(c, &format!("{field}[{i}]")))
        .collect()
}

/// A required single capability.
pub fn required_capability(
    cap: Option<&pb::VolumeCapability>,
    field: &str,
) -> Result<Capability, Status> {
    capability(
        cap.ok_or_else(|| Status::invalid_argument(format!("{field} is required")))?,
        field,
    )
}

/// Fills an unspecified mount fs_type from the volume context's `fsType`, else ext4.
pub fn resolve_fs(
    mut cap: Capability,
    ctx: &std::collections::HashMap<String, String>,
) -> Capability {
    if let AccessType::Mount { fs_type, .. } = &mut cap.access_type {
        if fs_type.is_empty() {
            *fs_type = ctx
                .get("fsType")
                .filter(|f| SUPPORTED_FS.contains(&f.as_str()))
                .cloned()
                .unwrap_or_else(|| DEFAULT_FS.to_string());
        }
    }
    cap
}

/// Back from the domain to the wire, for ValidateVolumeCapabilities' confirmation.
pub fn to_pb_capability(c: &Capability) -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessType as Pat};
    let mode = match c.access_mode {
        AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
        AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
    };
    let access_type = match &c.access_type {
        AccessType::Block => Pat::Block(pb::volume_capability::BlockVolume {}),
        AccessType::Mount {
            fs_type,
            mount_flags,
        } => Pat::Mount(pb::volume_capability::MountVolume {
            fs_type: fs_type.clone(),
            mount_flags: mount_flags.clone(),
            volume_mount_group: String::new(),
        }),
    };
    pb::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

/// A capacity range: negative numbers are INVALID_ARGUMENT.
pub fn capacity_range(
    r: Option<&pb::CapacityRange>,
) -> Result<crate::control::CapacityRange, Status> {
    let Some(r) = r else {
        return Ok(Default::default());
    };
    let field = |v: i64, name: &str| {
        u64::try_from(v).map_err(|_| {
            Status::invalid_argument(format!(
                "capacity_range.{name} must not be negative, got {v}"
            ))
        })
    };
    Ok(crate::control::CapacityRange {
        required: field(r.required_bytes, "required_bytes")?,
        limit: field(r.limit_bytes, "limit_bytes")?,
    })
}

/// Bytes as the wire's int64, saturating.
pub fn bytes_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
