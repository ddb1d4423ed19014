//! `/proc/self/mountinfo`: which device backs each mount point the agent can see.
//!
//! Paths are bytes, not UTF-8 (a local volume's directory may be named anything), and the kernel
//! escapes space, tab, newline and backslash in them as `\ooo` octal.
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use super::dev_id::DevId;

/// One mount, with the fields discovery reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub dev: DevId,
    /// What of the filesystem appears at the mount point: "/" for a whole filesystem, a
    /// subdirectory for a bind of a directory.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// The mount source ("/dev/sdb", "tmpfs", "server:/export").
    pub source: PathBuf,
}

/// Every well-formed line; the others are skipped (a debug log each), never fatal.
pub fn parse(text: &[u8]) -> Vec<Mount> {
    text.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .filter_map(|(n, line)| {
            let mount = parse_line(line);
            if mount.is_none() {
                tracing::debug!(
                    line = n + 1,
                    text = %String::from_utf8_lossy(&line[..line.len().min(200)]),
                    "skipping malformed mountinfo line"
                );
            }
            mount
        })
        .collect()
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`: ids, dev,
/// root, mount point, options, optional fields up to "-", then type, source, super options.
pub fn parse_line(line: &[u8]) -> Option<Mount> {
    let mut fields = line.split(|&b| b == b' ');
    let mut number = || -> Option<()> {
        let f = fields.next()?;
        (!f.is_empty() && f.iter().all(u8::is_ascii_digit)).then_some(())
    };
    number()?; // mount id
    number()?; // parent id
    let dev = DevId::parse(std::str::from_utf8(fields.next()?).ok()?)?;
    let root = fields.next().filter(|f| !f.is_empty())?;
    let mount_point = fields.next().filter(|f| f.first() == Some(&b'/'))?;
    fields.next()?; // mount options
    while fields.next()? != b"-" {}
    fields.next()?; // filesystem type
    let source = fields.next()?;
    Some(Mount {
        dev,
        root: path(unescape(root)),
        mount_point: path(unescape(mount_point)),
        source: path(unescape(source)),
    })
}

fn path(bytes: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes))
}

/// Undoes the kernel's `\ooo` escapes. Anything else, including a backslash not followed by
/// three octal digits of a byte value, is kept as it is.
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if let Some(byte) = octal_escape(&field[i..]) {
            out.push(byte);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

fn octal_escape(s: &[u8]) -> Option<u8> {
    match s {
        [b'\\', a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', ..] => {
            Some(((a - b'0') << 6) | ((b - b'0') << 3) | (c - b'0'))
        }
        _ => None,
    }
}

/// What the kernel does when it writes a path into mountinfo (`mangle`, " \t\n\\").
#[cfg(test)]
pub fn escape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\\') {
            out.extend_from_slice(format!("\\{b:03o}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::ffi::OsStrExt;

    const SAMPLE: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/mapper/root rw
36 22 8:17 / /var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc-1/mount rw shared:40 master:7 - ext4 /dev/sdb1 rw
37 22 8:33 /disks/vol\\0401 /var/lib/kubelet/with\\040space\\011tab\\012nl\\134bs rw - xfs /dev/sdc1 rw
38 22 0:52 / /var/lib/kubelet/pods/p1/volumes/kubernetes.io~projected/token rw - tmpfs tmpfs rw
39 22 8:49 / /mnt/données/日本 rw - ext4 /dev/sdd rw
";

    #[test]
    fn reads_devices_roots_and_unescaped_paths() {
        let mounts = parse(SAMPLE.as_bytes());
        assert_eq!(mounts.len(), 5);
        assert_eq!(mounts[0].dev, DevId::new(253, 1).unwrap());
        assert_eq!(mounts[0].source, PathBuf::from("/dev/mapper/root"));
        assert_eq!(
            mounts[1].mount_point,
            PathBuf::from("/var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc-1/mount"),
            "two optional fields before the separator"
        );
        assert_eq!(mounts[2].root, PathBuf::from("/disks/vol 1"));
        assert_eq!(
            mounts[2].mount_point,
            PathBuf::from("/var/lib/kubelet/with space\ttab\nnl\\bs")
        );
        assert!(mounts[3].dev.is_anonymous());
        assert_eq!(mounts[4].mount_point, PathBuf::from("/mnt/données/日本"));
    }

    #[test]
    fn skips_malformed_lines_and_keeps_the_rest() {
        let text = b"\
x 1 8:1 / /a rw - ext4 /dev/sda1 rw
1 1 8:1 / /b rw ext4 /dev/sda1 rw
1 1 8:x / /c rw - ext4 /dev/sda1 rw
1 1 8:1 / relative rw - ext4 /dev/sda1 rw
1 1 8:1  /e rw - ext4 /dev/sda1 rw
1 1 8:1 / /f rw -
1 1 8:1 /
\xff\xfe\n\n
1 1 8:2 / /ok\xff rw - ext4 /dev/sda2 rw";
        let mounts = parse(text);
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        assert_eq!(mounts[0].mount_point.as_os_str().as_bytes(), b"/ok\xff");
    }

    #[test]
    fn unescape_keeps_what_is_not_an_escape() {
        assert_eq!(unescape(br"a\040b"), b"a b");
        assert_eq!(unescape(br"\400"), br"\400", "above a byte");
        assert_eq!(unescape(br"\08"), br"\08");
        assert_eq!(unescape(br"tail\04"), br"tail\04");
        assert_eq!(unescape(br"\\134"), b"\\\\");
        assert_eq!(unescape(br"\000"), b"\0");
    }

    fn field() -> impl Strategy<Value = Vec<u8>> {
        // Bytes the kernel escapes are over-represented so escaping is exercised.
        proptest::collection::vec(
            prop_oneof![
                Just(b' '),
                Just(b'\t'),
                Just(b'\n'),
                Just(b'\\'),
                any::<u8>()
            ],
            0..40,
        )
    }

    proptest! {
        #[test]
        fn unescape_inverts_escape(bytes in field()) {
            prop_assert_eq!(unescape(&escape(&bytes)), bytes);
        }

        #[test]
        fn escaped_fields_have_no_separators(bytes in field()) {
            let e = escape(&bytes);
            prop_assert!(!e.iter().any(|b| matches!(b, b' ' | b'\t' | b'\n')));
        }

        #[test]
        fn hostile_input_never_panics(text in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse(&text);
            let _ = unescape(&text);
        }

        #[test]
        fn hostile_text_lines_never_panic(text in "([0-9: /\\\\-]|[a-z]|\\PC){0,120}") {
            let _ = parse(text.as_bytes());
        }

        #[test]
        fn well_formed_lines_round_trip(
            major in 0u32..4096,
            minor in 0u32..(1 << 20),
            root in field(),
            mount_point in field(),
            source in field(),
            optional in proptest::collection::vec("[a-z]+:[0-9]+", 0..3),
        ) {
            let mount_point = [b"/".as_slice(), &mount_point].concat();
            let root = [b"/".as_slice(), &root].concat();
            let mut line = format!("12 3 {major}:{minor} ").into_bytes();
            line.extend(escape(&root));
            line.push(b' ');
            line.extend(escape(&mount_point));
            line.extend(b" rw,relatime");
            for o in &optional {
                line.extend(format!(" {o}").as_bytes());
            }
            line.extend(b" - ext4 ");
            line.extend(escape(&source));
            line.extend(b" rw");
            let m = parse_line(&line).expect("well-formed line");
            prop_assert_eq!(m.dev, DevId::new(major, minor).unwrap());
            prop_assert_eq!(m.root.as_os_str().as_bytes(), &root[..]);
            prop_assert_eq!(m.mount_point.as_os_str().as_bytes(), &mount_point[..]);
            prop_assert_eq!(m.source.as_os_str().as_bytes(), &source[..]);
        }
    }
}
