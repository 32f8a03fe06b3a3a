//! Mounts as the kernel shows them: mountinfo parsing, mounting, bind mounts, unmounting and
//! statistics on real loop devices and tmpfs (as root).

use super::test_support::{is_root, unmount_and_remove, MountGuard};
use super::*;

const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
30 27 7:3 / /var/lib/kubelet/plugins/kubernetes.io/csi/driver.palisade.io/abc/globalmount rw,noatime shared:40 - ext4 /dev/loop3 rw
31 27 7:3 / /var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc-1/mount ro,noatime shared:40 master:2 - ext4 /dev/loop3 rw
32 27 0:6 /loop3 /var/lib/kubelet/pods/p2/volumeDevices/kubernetes.io~csi/pvc-2 rw,nosuid - devtmpfs udev rw,size=12334460k
33 27 254:0 /srv/my\\040data /mnt/with\\040space\\011tab\\134 rw - ext4 /dev/vda rw
34 27 0:44 / /mnt/empty\\040source rw - tmpfs  rw,size=4k
";

#[test]
fn parses_plain_bind_and_escaped_lines() {
    let mounts = parse_mountinfo(SAMPLE).unwrap();
    assert_eq!(mounts.len(), 7);

    let root = &mounts[1];
    assert_eq!((root.id, root.parent), (27, 1));
    assert_eq!(root.major_minor, (254, 0));
    assert_eq!(root.mount_point, Path::new("/"));
    assert_eq!(root.optional_fields, vec!["shared:1"]);
    assert_eq!(root.super_options, vec!["rw", "discard"]);

    let publish = &mounts[3];
    assert!(publish.is_read_only());
    assert_eq!(publish.optional_fields, vec!["shared:40", "master:2"]);
    assert_eq!(publish.source, "/dev/loop3");
    assert_eq!(publish.major_minor, (7, 3));

    let block = &mounts[4];
    assert_eq!(block.root, Path::new("/loop3"));
    assert_eq!(block.fs_type, "devtmpfs");
    assert!(block.optional_fields.is_empty());
    assert_eq!(block.super_options, vec!["rw", "size=12334460k"]);

    let escaped = &mounts[5];
    assert_eq!(escaped.root, Path::new("/srv/my data"));
    assert_eq!(escaped.mount_point, Path::new("/mnt/with space\ttab\\"));

    let empty = &mounts[6];
    assert_eq!(empty.source, "");
    assert_eq!(empty.fs_type, "tmpfs");
    assert_eq!(empty.mount_point, Path::new("/mnt/empty source"));
}

#[test]
fn non_utf8_mount_point_is_kept_byte_for_byte() {
    let mounts = parse_mountinfo("1 0 0:1 / /mnt/\\377x rw - tmpfs t rw").unwrap();
    assert_eq!(
        mounts[0].mount_point.as_os_str().as_encoded_bytes(),
        b"/mnt/\xffx"
    );
}

#[test]
fn malformed_lines_are_errors_naming_the_line() {
    let cases = [
        "22 27 0:21 / /proc rw,relatime proc proc rw", // no separator
        "22 27 0:21 / /proc rw - proc",                // too few after separator
        "x 27 0:21 / /proc rw - proc proc rw",         // id not a number
        "22 27 021 / /proc rw - proc proc rw",         // no major:minor
        "22 27 0:21 / /pr\\04 rw - proc proc rw",      // truncated escape
        "22 27 0:21 / /pr\\777 rw - proc proc rw",     // escape out of byte range
        "22 27 0:21",                                  // truncated
    ];
    for case in cases {
        let text = format!("22 27 0:21 / /proc rw - proc proc rw\n\n{case}\n");
        match parse_mountinfo(&text) {
            Err(MountError::Parse { line: 3, .. }) => {}
            other => panic!("{case:?}: expected a parse error on line 3, got {other:?}"),
        }
    }
}

#[test]
fn real_mountinfo_parses_and_has_root() {
    let mounts = read_mountinfo().unwrap();
    assert!(mounts.iter().any(|m| m.mount_point == Path::new("/")));
    assert!(is_mount_point(Path::new("/")).unwrap());
    assert!(!is_mount_point(Path::new("/definitely/not/there")).unwrap());
}

#[test]
fn options_translate_to_flags_and_data() {
    let opts: Vec<String> = [
        "noatime,nodiratime",
        "discard",
        "rw",
        "nosuid",
        "errors=remount-ro",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let t = translate_options(&opts, false).unwrap();
    assert_eq!(
        t.flags,
        MsFlags::MS_NOATIME | MsFlags::MS_NODIRATIME | MsFlags::MS_NOSUID
    );
    assert_eq!(t.data, "discard,errors=remount-ro");

    let t = translate_options(&["rw".to_string()], true).unwrap();
    assert_eq!(t.flags, MsFlags::MS_RDONLY);

    let t = translate_options(&["ro".to_string(), "sync".to_string()], false).unwrap();
    assert_eq!(t.flags, MsFlags::MS_RDONLY | MsFlags::MS_SYNCHRONOUS);

    for bad in ["bind", "remount", "rshared"] {
        assert!(matches!(
            translate_options(&[bad.to_string()], false),
            Err(MountError::InvalidOption { .. })
        ));
    }
}

#[test]
fn tmpfs_bind_ro_rw_and_unmount_twice() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs_dir = dir.path().join("fs");
    let ro = dir.path().join("ro");
    let rw = dir.path().join("nested/rw");
    let _guard = MountGuard(vec![fs_dir.clone(), ro.clone(), rw.clone()]);
    std::fs::create_dir(dir.path().join("nested")).unwrap();

    let opts = vec!["size=16m".to_string(), "nosuid".to_string()];
    mount_fs(Path::new("tmpfs"), &fs_dir, "tmpfs", &opts, false).unwrap();
    mount_fs(Path::new("tmpfs"), &fs_dir, "tmpfs", &opts, false).unwrap(); // idempotent
    assert!(matches!(
        mount_fs(Path::new("tmpfs"), &fs_dir, "tmpfs", &opts, true),
        Err(MountError::Incompatible { .. })
    ));
    assert!(matches!(
        mount_fs(Path::new("other"), &fs_dir, "tmpfs", &opts, false),
        Err(MountError::Occupied { .. })
    ));
    let top = mounts_at(&fs_dir).unwrap().pop().unwrap();
    assert_eq!(top.fs_type, "tmpfs");
    assert!(top.options.contains(&"nosuid".to_string()));
    assert!(top.super_options.contains(&"size=16384k".to_string()));
    assert_eq!(
        find_mounts_of_source(Path::new("tmpfs"))
            .unwrap()
            .iter()
            .filter(|m| m.mount_point == top.mount_point)
            .count(),
        1
    );
    std::fs::write(fs_dir.join("data"), b"hello").unwrap();

    bind_mount(&fs_dir, &ro, true).unwrap();
    bind_mount(&fs_dir, &ro, true).unwrap(); // idempotent
    let ro_mount = mounts_at(&ro).unwrap();
    assert_eq!(ro_mount.len(), 1);
    assert!(ro_mount[0].is_read_only());
    assert!(
        ro_mount[0].options.contains(&"nosuid".to_string()),
        "flags kept"
    );
    assert_eq!(std::fs::read(ro.join("data")).unwrap(), b"hello");
    let err = std::fs::write(ro.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert!(matches!(
        bind_mount(&fs_dir, &ro, false),
        Err(MountError::Incompatible { .. })
    ));

    bind_mount(&fs_dir, &rw, false).unwrap();
    bind_mount(&fs_dir, &rw, false).unwrap();
    assert!(!mounts_at(&rw).unwrap()[0].is_read_only());
    std::fs::write(rw.join("new"), b"x").unwrap();
    assert!(fs_dir.join("new").exists());
    // A rw bind that a crash left before its remount becomes read-only on retry.
    bind_mount(&fs_dir, &rw, true).unwrap();
    assert!(mounts_at(&rw).unwrap().pop().unwrap().is_read_only());
    // A different source at the same target is refused.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    assert!(matches!(
        bind_mount(&other, &rw, true),
        Err(MountError::Occupied { .. })
    ));

    // Busy: a file open below the mount keeps it mounted, and says so.
    let open = std::fs::File::open(ro.join("data")).unwrap();
    assert!(matches!(unmount(&ro), Err(MountError::Busy { .. })));
    assert!(is_mount_point(&ro).unwrap());
    drop(open);

    for target in [&ro, &rw] {
        unmount(target).unwrap();
        unmount(target).unwrap();
        assert!(!is_mount_point(target).unwrap());
        assert!(target.exists());
        unmount_and_remove(target).unwrap();
        unmount_and_remove(target).unwrap();
        assert!(!target.exists());
    }
    let stats = stats(&fs_dir).unwrap();
    assert_eq!(stats.bytes_total, 16 << 20);
    assert!(stats.bytes_used > 0 && stats.bytes_used < stats.bytes_total);
    assert!(stats.inodes_used >= 2);
    // The files live in the tmpfs: once it is unmounted, the directory is empty again.
    unmount_and_remove(&fs_dir).unwrap();
    assert!(!fs_dir.exists());
    unmount(&dir.path().join("never-existed")).unwrap();
}

#[test]
fn stacked_mounts_all_come_off() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t");
    let _guard = MountGuard(vec![target.clone()]);
    std::fs::create_dir(&target).unwrap();
    for _ in 0..3 {
        nix::mount::mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
    }
    assert_eq!(mounts_at(&target).unwrap().len(), 3);
    assert!(unmount_top(&target).unwrap());
    assert_eq!(mounts_at(&target).unwrap().len(), 2, "one came off");
    unmount(&target).unwrap();
    assert!(!is_mount_point(&target).unwrap());
    assert!(!unmount_top(&target).unwrap(), "nothing left to unmount");
    assert!(!unmount_top(&dir.path().join("missing")).unwrap());
}

#[test]
fn unmount_and_remove_refuses_a_non_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("f"), b"x").unwrap();
    assert!(matches!(
        unmount_and_remove(&target),
        Err(MountError::Io { .. })
    ));
    assert!(target.join("f").exists());
}
