//! Loop devices, the content guard, mkfs and filesystem growth on real loop devices (as root;
//! the tests that need root say so and skip otherwise).

use super::*;
use crate::node::mount;
use crate::node::mount::test_support::{is_root, MountGuard};
use std::io::Write;

/// Unmounts, then detaches, whatever a test set up, even when an assertion failed.
struct Cleanup {
    mounts: MountGuard,
    /// The backing files of the loops to detach: a device number is looked up again at
    /// drop time, because after a test's own detach another process may hold it.
    loops: Vec<PathBuf>,
}

impl Cleanup {
    fn new() -> Self {
        Cleanup {
            mounts: MountGuard(Vec::new()),
            loops: Vec::new(),
        }
    }

    fn attach(&mut self, file: &Path) -> PathBuf {
        let device = attach_loop(file).unwrap();
        self.loops.push(file.to_path_buf());
        device
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.mounts.unmount_all();
        // The test's temporary directory may be gone already (it is dropped first), so
        // a backing file may read "<path> (deleted)".
        let attached = list_loops().unwrap_or_default();
        for file in &self.loops {
            let deleted = PathBuf::from(format!("{} (deleted)", file.display()));
            for (device, backing) in &attached {
                if (backing == file || *backing == deleted) && detach_loop(device).is_err() {
                    let _ = Command::new("losetup").arg("-d").arg(device).status();
                }
            }
        }
    }
}

fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn write_at(device: &Path, offset: u64, bytes: &[u8]) {
    let mut f = fs::OpenOptions::new().write(true).open(device).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

fn have_xfs() {
    assert!(
        Command::new("mkfs.xfs").arg("-V").output().is_ok(),
        "mkfs.xfs is missing: install xfsprogs (apt-get install -y xfsprogs)"
    );
}

const MIB: u64 = 1 << 20;

/// Whether this process has CAP_SYS_RESOURCE (bit 24 of CapEff), which online ext4
/// resizing needs; sandboxes may drop it even for root.
fn has_cap_sys_resource() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << 24) != 0
}

#[test]
fn loop_attach_find_detach_are_idempotent() {
    if !is_root() {
        return;
    }
    let mut cleanup = Cleanup::new();
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "replica.img", 64 * MIB);

    assert_eq!(find_loop_for(&file).unwrap(), None);
    let device = cleanup.attach(&file);
    assert_eq!(attach_loop(&file).unwrap(), device);
    // Another name for the same file finds the same device.
    let other_name = dir.path().join(".").join("replica.img");
    assert_eq!(attach_loop(&other_name).unwrap(), device);
    assert_eq!(find_loop_for(&file).unwrap(), Some(device.clone()));
    assert!(list_loops()
        .unwrap()
        .contains(&(device.clone(), fs::canonicalize(&file).unwrap())));
    assert_eq!(device_size(&device).unwrap(), 64 * MIB);

    // Grow the file; the device follows after a refresh.
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(96 * MIB)
        .unwrap();
    refresh_loop_capacity(&device).unwrap();
    refresh_loop_capacity(&device).unwrap();
    assert_eq!(device_size(&device).unwrap(), 96 * MIB);

    detach_loop(&device).unwrap();
    detach_loop(&device).unwrap();
    assert_eq!(find_loop_for(&file).unwrap(), None);
    detach_loop(Path::new("/dev/no-such-loop")).unwrap();

    assert_eq!(
        find_loop_for(&dir.path().join("missing.img")).unwrap(),
        None
    );
    assert!(matches!(
        attach_loop(&dir.path().join("missing.img")),
        Err(BlockError::Io { .. })
    ));
    assert!(matches!(
        device_size(&file),
        Err(BlockError::NotABlockDevice { .. })
    ));
}

/// Writes an executable stand-in for losetup that fails whenever it is asked for direct
/// I/O. If `attach_anyway`, it first attaches the file without direct I/O, and fails any
/// later call: the caller must find the device that the failed call left.
fn losetup_without_direct_io(dir: &Path, name: &str, attach_anyway: bool) -> String {
    let path = dir.join(name);
    let (on_direct_io, otherwise) = if attach_anyway {
        (r#"losetup --find "$4""#, "exit 1")
    } else {
        (":", r#"exec losetup "$@""#)
    };
    let script = format!(
        r#"#!/bin/sh
# Arguments: --find --show [--direct-io=on] FILE
if [ "$3" = "--direct-io=on" ]; then
{on_direct_io}
echo "losetup: $4: direct io not supported" >&2
exit 1
fi
{otherwise}
"#
    );
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn attach_falls_back_to_buffered_io() {
    if !is_root() {
        return;
    }
    let mut cleanup = Cleanup::new();
    let dir = tempfile::tempdir().unwrap();
    for attach_anyway in [false, true] {
        let file = sparse_file(dir.path(), &format!("r-{attach_anyway}.img"), 8 * MIB);
        let losetup = losetup_without_direct_io(
            dir.path(),
            &format!("losetup-{attach_anyway}"),
            attach_anyway,
        );
        let device = attach_loop_using(&losetup, &file, None).unwrap();
        cleanup.loops.push(file.clone());
        assert_eq!(find_loop_for(&file).unwrap(), Some(device.clone()));
        let backing = fs::canonicalize(&file).unwrap();
        let attached: Vec<_> = list_loops()
            .unwrap()
            .into_iter()
            .filter(|(_, b)| *b == backing)
            .collect();
        assert_eq!(attached.len(), 1, "one device, not two: {attached:?}");
        let name = device.file_name().unwrap();
        let dio = fs::read_to_string(Path::new("/sys/block").join(name).join("loop/dio"));
        assert_eq!(dio.unwrap().trim(), "0", "attached without direct I/O");
        detach_loop(&device).unwrap();
    }
}

#[test]
fn loop_on_tmpfs_and_deleted_backing_file() {
    if !is_root() {
        return;
    }
    let mut cleanup = Cleanup::new();
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let file = sparse_file(dir.path(), "r.img", 8 * MIB);
    let device = cleanup.attach(&file);
    assert_eq!(device_size(&device).unwrap(), 8 * MIB);
    let canonical = fs::canonicalize(&file).unwrap();

    fs::remove_file(&file).unwrap();
    let listed = list_loops().unwrap();
    let (_, backing) = listed.iter().find(|(d, _)| *d == device).unwrap();
    let mut deleted = canonical.into_os_string();
    deleted.push(" (deleted)");
    assert_eq!(*backing, PathBuf::from(deleted));
    // A loop over a deleted file backs no file, not even a new one at the same path.
    assert_eq!(find_loop_for(&file).unwrap(), None);
    let new_file = sparse_file(dir.path(), "r.img", 8 * MIB);
    let new_device = cleanup.attach(&new_file);
    assert_ne!(new_device, device);
    detach_loop(&device).unwrap();
    detach_loop(&new_device).unwrap();
}

#[test]
fn blank_detection_and_make_fs_guard() {
    if !is_root() {
        return;
    }
    have_xfs();
    let mut cleanup = Cleanup::new();
    let dir = tempfile::tempdir().unwrap();
    let ext4 = cleanup.attach(&sparse_file(dir.path(), "ext4.img", 64 * MIB));
    let xfs = cleanup.attach(&sparse_file(dir.path(), "xfs.img", 320 * MIB));

    for device in [&ext4, &xfs] {
        assert_eq!(probe(device).unwrap(), Contents::Blank);
        assert!(is_blank(device).unwrap());
        assert_eq!(detect_fs(device).unwrap(), None);
    }

    assert!(matches!(
        make_fs(&ext4, "btrfs", &[]),
        Err(BlockError::UnsupportedFs { .. })
    ));
    assert!(
        is_blank(&ext4).unwrap(),
        "an unsupported type touches nothing"
    );

    make_fs(&ext4, "ext4", &[]).unwrap();
    make_fs(&xfs, "xfs", &["-L".to_string(), "data".to_string()]).unwrap();
    assert_eq!(probe(&ext4).unwrap(), Contents::Filesystem("ext4".into()));
    assert_eq!(probe(&xfs).unwrap(), Contents::Filesystem("xfs".into()));
    assert_eq!(detect_fs(&ext4).unwrap().as_deref(), Some("ext4"));
    assert_eq!(detect_fs(&xfs).unwrap().as_deref(), Some("xfs"));
    for device in [&ext4, &xfs] {
        assert!(!is_blank(device).unwrap());
        for fs_type in SUPPORTED_FS_TYPES {
            match make_fs(device, fs_type, &[]) {
                Err(BlockError::NotBlank { found, .. }) => {
                    assert!(matches!(found, Contents::Filesystem(_)))
                }
                other => panic!("make_fs on a filesystem: {other:?}"),
            }
        }
    }
    assert_eq!(detect_fs(&ext4).unwrap().as_deref(), Some("ext4"));
    assert_eq!(detect_fs(&xfs).unwrap().as_deref(), Some("xfs"));

    // ext4 with its magic wiped, as `wipefs` leaves it: blkid sees nothing, but the rest
    // of the superblock is there.
    write_at(&ext4, 1024 + 0x38, &[0, 0]);
    assert_eq!(detect_fs(&ext4).unwrap(), None);
    assert!(matches!(
        probe(&ext4).unwrap(),
        Contents::UnrecognizedData(_)
    ));
    assert!(matches!(
        make_fs(&ext4, "ext4", &[]),
        Err(BlockError::NotBlank { .. })
    ));

    // A partition table; a lone byte near the end.
    let mbr = cleanup.attach(&sparse_file(dir.path(), "mbr.img", 64 * MIB));
    let mut entry = [0u8; 16];
    entry[4] = 0x83; // Linux
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes()); // first sector
    entry[12..16].copy_from_slice(&65536u32.to_le_bytes()); // sectors
    write_at(&mbr, 446, &entry);
    write_at(&mbr, 510, &[0x55, 0xaa]);
    assert_eq!(probe(&mbr).unwrap(), Contents::PartitionTable("dos".into()));
    let tail = cleanup.attach(&sparse_file(dir.path(), "tail.img", 64 * MIB));
    write_at(&tail, 64 * MIB - 100, &[1]);
    assert_eq!(
        probe(&tail).unwrap(),
        Contents::UnrecognizedData(64 * MIB - 100)
    );
    assert!(!is_blank(&tail).unwrap());

    // A swap signature is not a filesystem, and not blank.
    let swap = cleanup.attach(&sparse_file(dir.path(), "swap.img", 64 * MIB));
    run("mkswap", &[swap.as_os_str()]).unwrap();
    assert_eq!(probe(&swap).unwrap(), Contents::Signature("swap".into()));

    // What cannot be read is an error, never blank.
    assert!(is_blank(&dir.path().join("missing")).is_err());
    assert!(is_blank(dir.path()).is_err());
}

/// How a test device grows.
#[derive(PartialEq)]
enum Growth {
    /// Its backing file grows ([`refresh_loop_capacity`]).
    File,
    /// It shows more of a larger backing file ([`set_loop_limit`]), as over an engine.
    Limit,
}

/// Makes a filesystem on a loop device, mounts it, writes a file, grows the device,
/// and checks the filesystem grew online and the file is intact.
fn grow_online(fs_type: &str, size: u64, grown: u64, growth: Growth) {
    let mut cleanup = Cleanup::new();
    let dir = tempfile::tempdir().unwrap();
    let (file, device) = match growth {
        Growth::File => {
            let file = sparse_file(dir.path(), "vol.img", size);
            let device = cleanup.attach(&file);
            (file, device)
        }
        Growth::Limit => {
            let file = sparse_file(dir.path(), "vol.img", 4 * grown);
            let device = attach_loop_limited(&file, size).unwrap();
            cleanup.loops.push(file.clone());
            assert_eq!(device_size(&device).unwrap(), size);
            (file, device)
        }
    };
    let target = dir.path().join("mnt");
    cleanup.mounts.0.push(target.clone());

    make_fs(&device, fs_type, &[]).unwrap();
    mount::mount_fs(&device, &target, fs_type, &["noatime".to_string()], false).unwrap();
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    fs::write(target.join("payload"), &payload).unwrap();
    let before = mount::stats(&target).unwrap();

    // A mounted loop device is not detached.
    assert!(matches!(
        detach_loop(&device),
        Err(BlockError::InUse { .. })
    ));
    assert_eq!(find_loop_for(&file).unwrap(), Some(device.clone()));
    let users = mount::find_mounts_of_source(&device).unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].mount_point, fs::canonicalize(&target).unwrap());

    match growth {
        Growth::File => {
            fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .unwrap()
                .set_len(grown)
                .unwrap();
            refresh_loop_capacity(&device).unwrap();
        }
        Growth::Limit => {
            // Mounted and in use: the kernel takes it online.
            set_loop_limit(&device, grown).unwrap();
            set_loop_limit(&device, grown).unwrap();
            assert!(set_loop_limit(&device, size).is_err(), "never shrinks");
        }
    }
    assert_eq!(device_size(&device).unwrap(), grown);
    if fs_type == "ext4" && !has_cap_sys_resource() {
        // Online ext4 resizing needs CAP_SYS_RESOURCE. Without it, check that the refusal
        // says so, then grow the same filesystem offline with the same call.
        eprintln!("no CAP_SYS_RESOURCE: ext4 grows offline in this test, not online");
        assert!(matches!(
            grow_fs(&device, &target, fs_type),
            Err(BlockError::ResizeNotPermitted { .. })
        ));
        mount::unmount(&target).unwrap();
        run(
            "e2fsck",
            &[OsStr::new("-f"), OsStr::new("-p"), device.as_os_str()],
        )
        .unwrap();
        grow_fs(&device, &target, fs_type).unwrap();
        grow_fs(&device, &target, fs_type).unwrap();
        mount::mount_fs(&device, &target, fs_type, &[], false).unwrap();
    } else {
        grow_fs(&device, &target, fs_type).unwrap();
        grow_fs(&device, &target, fs_type).unwrap();
    }

    let after = mount::stats(&target).unwrap();
    assert!(
        after.bytes_total > before.bytes_total + (grown - size) * 3 / 4,
        "{fs_type}: {before:?} -> {after:?}"
    );
    assert_eq!(fs::read(target.join("payload")).unwrap(), payload);

    mount::unmount(&target).unwrap();
    detach_loop(&device).unwrap();
    assert_eq!(find_loop_for(&file).unwrap(), None);
}

#[test]
fn grow_ext4_online_where_permitted() {
    if !is_root() {
        return;
    }
    grow_online("ext4", 64 * MIB, 128 * MIB, Growth::File);
}

#[test]
fn grow_xfs_online() {
    if !is_root() {
        return;
    }
    have_xfs();
    grow_online("xfs", 320 * MIB, 512 * MIB, Growth::File);
}

/// A device over a larger file (an engine's export) grows by its size limit, mounted.
#[test]
fn grow_xfs_online_by_size_limit() {
    if !is_root() {
        return;
    }
    have_xfs();
    grow_online("xfs", 320 * MIB, 512 * MIB, Growth::Limit);
}

#[test]
fn block_volume_bind_mount_onto_a_file() {
    if !is_root() {
        return;
    }
    let mut cleanup = Cleanup::new();
    let dir = tempfile::tempdir().unwrap();
    let device = cleanup.attach(&sparse_file(dir.path(), "raw.img", 16 * MIB));
    let target = dir.path().join("pod-device");
    cleanup.mounts.0.push(target.clone());

    mount::bind_mount(&device, &target, false).unwrap();
    mount::bind_mount(&device, &target, false).unwrap();
    assert!(mount::is_mount_point(&target).unwrap());
    assert_eq!(device_size(&target).unwrap(), 16 * MIB);
    let users = mount::find_mounts_of_source(&device).unwrap();
    assert_eq!(users.len(), 1, "{users:?}");
    assert!(matches!(
        detach_loop(&device),
        Err(BlockError::InUse { .. })
    ));
    write_at(&target, 4096, b"through the bind mount");
    let mut buf = vec![0u8; 22];
    let mut f = fs::File::open(&device).unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, b"through the bind mount");
    drop(f);

    mount::test_support::unmount_and_remove(&target).unwrap();
    mount::test_support::unmount_and_remove(&target).unwrap();
    assert!(!target.exists());
    detach_loop(&device).unwrap();
}
