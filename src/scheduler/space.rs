//! Disk space arithmetic of placement: Longhorn's two space checks, and the headroom they
//! leave (the largest replica a disk can still take), which GetCapacity reports.

use crate::settings::Settings;

/// The figures of one disk that the space checks read, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskSpace {
    /// Size of the disk's filesystem.
    pub maximum: u64,
    /// Free bytes on that filesystem now.
    pub available: u64,
    /// Bytes the operator keeps out of scheduling.
    pub reserved: u64,
    /// Sum of the sizes of the replicas placed on the disk (any state).
    pub scheduled: u64,
}

/// The two space percentages of the settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpacePolicy {
    /// storage-minimal-available-percentage.
    pub minimal_available_pct: u64,
    /// storage-over-provisioning-percentage.
    pub over_provisioning_pct: u64,
}

impl SpacePolicy {
    /// The percentages from the settings.
    pub fn from_settings(settings: &Settings) -> Self {
        SpacePolicy {
            minimal_available_pct: settings.storage_minimal_available_percentage,
            over_provisioning_pct: settings.storage_over_provisioning_percentage,
        }
    }

    /// Bytes that must stay free on the disk: maximum × minimal% / 100, truncated (Longhorn
    /// computes the same product in floating point and truncates).
    pub fn minimal_available(&self, d: &DiskSpace) -> u64 {
        percent_of(d.maximum, self.minimal_available_pct)
    }

    /// Bytes that may be scheduled on the disk: (maximum − reserved) × over-provisioning% /
    /// 100, truncated.
    pub fn provisioning_limit(&self, d: &DiskSpace) -> u64 {
        percent_of(
            d.maximum.saturating_sub(d.reserved),
            self.over_provisioning_pct,
        )
    }

    /// Longhorn's actual space check: `available − required > minimal_available`.
    pub fn actual_fits(&self, d: &DiskSpace, required: u64) -> bool {
        d.available
            .checked_sub(required)
            .is_some_and(|left| left > self.minimal_available(d))
    }

    /// Longhorn's scheduled space check: `size + scheduled ≤ provisioning_limit`.
    pub fn scheduled_fits(&self, d: &DiskSpace, size: u64) -> bool {
        size.checked_add(d.scheduled)
            .is_some_and(|total| total <= self.provisioning_limit(d))
    }

    /// The largest replica that passes the actual check: `available − minimal − 1`, or 0
    /// when nothing is left above the minimum.
    pub fn actual_headroom(&self, d: &DiskSpace) -> u64 {
        d.available
            .saturating_sub(self.minimal_available(d))
            .saturating_sub(1)
    }

    /// The largest replica that passes the scheduled check: `limit − scheduled`, or 0.
    pub fn scheduled_headroom(&self, d: &DiskSpace) -> u64 {
        self.provisioning_limit(d).saturating_sub(d.scheduled)
    }

    /// The largest replica the disk can take under both checks.
    pub fn headroom(&self, d: &DiskSpace) -> u64 {
        self.actual_headroom(d).min(self.scheduled_headroom(d))
    }
}

/// `bytes × pct / 100`, truncated, without overflow (in u64 when the product fits, which
/// is every real disk; u128 otherwise).
fn percent_of(bytes: u64, pct: u64) -> u64 {
    match bytes.checked_mul(pct) {
        Some(product) => product / 100,
        None => u64::try_from(u128::from(bytes) * u128::from(pct) / 100).unwrap_or(u64::MAX),
    }
}

/// The free space a placement leaves on a disk, as a fraction of what the disk offers for
/// scheduling: `(available − reserved − scheduled − extra) / (maximum − reserved)`. Like
/// Longhorn's balance score it counts every scheduled byte as if already written, so that
/// it falls with each placement even on sparse files; it may be negative on an
/// over-provisioned disk.
pub fn free_after(d: &DiskSpace, extra: u64) -> Free {
    let usable = i128::from(d.available)
        - i128::from(d.reserved)
        - i128::from(d.scheduled)
        - i128::from(extra);
    let total = d.maximum.saturating_sub(d.reserved).max(1);
    Free {
        usable,
        total: i128::from(total),
    }
}

/// Free bytes over total bytes, summable over the disks of a node.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Free {
    pub usable: i128,
    pub total: i128,
}

impl Free {
    /// The sum of two figures (a node's disks together).
    pub fn plus(self, other: Free) -> Free {
        Free {
            usable: self.usable + other.usable,
            total: self.total + other.total,
        }
    }

    /// The ratio after taking `bytes` more.
    pub fn ratio_after(self, bytes: u64) -> f64 {
        (self.usable - i128::from(bytes)) as f64 / self.total.max(1) as f64
    }
}

/// Bytes for people: "10 GiB", "1.5 TiB", "512 B".
pub fn human(bytes: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("PiB", 1 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{} {unit}", bytes / size)
            } else {
                format!("{:.1} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: SpacePolicy = SpacePolicy {
        minimal_available_pct: 25,
        over_provisioning_pct: 100,
    };

    fn disk(maximum: u64, available: u64, reserved: u64, scheduled: u64) -> DiskSpace {
        DiskSpace {
            maximum,
            available,
            reserved,
            scheduled,
        }
    }

    #[test]
    fn actual_check_is_strictly_greater_than_the_minimum() {
        let d = disk(1000, 350, 0, 0);
        assert_eq!(POLICY.minimal_available(&d), 250);
        assert!(POLICY.actual_fits(&d, 99)); // 251 > 250
        assert!(!POLICY.actual_fits(&d, 100)); // 250 > 250 is false
        assert!(!POLICY.actual_fits(&d, 351)); // more than available
        assert_eq!(POLICY.actual_headroom(&d), 99);
        assert_eq!(POLICY.actual_headroom(&disk(1000, 250, 0, 0)), 0);
    }

    #[test]
    fn scheduled_check_allows_exactly_the_limit() {
        let d = disk(1000, 1000, 100, 800);
        assert_eq!(POLICY.provisioning_limit(&d), 900);
        assert!(POLICY.scheduled_fits(&d, 100));
        assert!(!POLICY.scheduled_fits(&d, 101));
        assert!(!POLICY.scheduled_fits(&d, u64::MAX));
        assert_eq!(POLICY.scheduled_headroom(&d), 100);
        let over = SpacePolicy {
            over_provisioning_pct: 200,
            ..POLICY
        };
        assert_eq!(over.provisioning_limit(&d), 1800);
        assert_eq!(over.scheduled_headroom(&d), 1000);
    }

    #[test]
    fn headroom_is_the_smaller_of_both_and_passes_both_checks() {
        for d in [
            disk(1000, 350, 0, 0),
            disk(1000, 1000, 100, 800),
            disk(1000, 900, 300, 0),
            disk(7919, 6007, 13, 977),
        ] {
            let h = POLICY.headroom(&d);
            assert!(
                POLICY.actual_fits(&d, h) && POLICY.scheduled_fits(&d, h),
                "{d:?}"
            );
            let next = h + 1;
            assert!(
                !(POLICY.actual_fits(&d, next) && POLICY.scheduled_fits(&d, next)),
                "{d:?}"
            );
        }
    }

    #[test]
    fn percentages_truncate_without_overflow() {
        let d = disk(u64::MAX, u64::MAX, 0, 0);
        assert_eq!(POLICY.minimal_available(&d), u64::MAX / 4);
        let big = SpacePolicy {
            over_provisioning_pct: 10_000,
            ..POLICY
        };
        assert_eq!(big.provisioning_limit(&d), u64::MAX);
        assert_eq!(POLICY.minimal_available(&disk(999, 0, 0, 0)), 249);
    }

    #[test]
    fn free_ratio_falls_with_scheduled_bytes() {
        let empty = free_after(&disk(1000, 1000, 0, 0), 0);
        let half = free_after(&disk(1000, 1000, 0, 500), 0);
        assert!(empty.ratio_after(10) > half.ratio_after(10));
        let over = free_after(&disk(1000, 1000, 0, 1500), 0);
        assert!(over.ratio_after(0) < 0.0);
        assert_eq!(empty.plus(half).total, 2000);
    }

    #[test]
    fn human_bytes() {
        assert_eq!(human(10 << 30), "10 GiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(0), "0 B");
    }
}
