//! Device numbers as text ("8:1" in mountinfo and sysfs `dev` files) and from `stat`.
use std::fmt;

use crate::devices::mkdev;

/// A block device number. Only values the kernel's internal dev_t can hold are accepted, so
/// [`DevId::kernel`] never aliases two devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}

const MAX_MAJOR: u32 = (1 << 12) - 1;
const MAX_MINOR: u32 = (1 << 20) - 1;
/// u32::MAX has 10 digits; longer input is rejected before parsing.
const MAX_DIGITS: usize = 10;

impl DevId {
    pub fn new(major: u32, minor: u32) -> Option<Self> {
        (major <= MAX_MAJOR && minor <= MAX_MINOR).then_some(Self { major, minor })
    }

    /// "MAJ:MIN", digits only: `u32::from_str` would also take "+8", which no kernel writes.
    pub fn parse(text: &str) -> Option<Self> {
        let (major, minor) = text.split_once(':')?;
        Self::new(parse_digits(major)?, parse_digits(minor)?)
    }

    /// A userspace dev_t (st_rdev, st_dev), whose encoding is glibc's, not the kernel's.
    pub fn from_stat(dev: u64) -> Option<Self> {
        Self::new(libc::major(dev), libc::minor(dev))
    }

    /// The key the agent's histograms use (see `devices::mkdev`).
    pub fn kernel(self) -> u32 {
        mkdev(self.major, self.minor)
    }

    /// Major 0: tmpfs, overlay, NFS, btrfs subvolumes… a number with no block device behind it.
    pub fn is_anonymous(self) -> bool {
        self.major == 0
    }
}

fn parse_digits(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > MAX_DIGITS || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_kernel_text_only() {
        assert_eq!(DevId::parse("8:1"), DevId::new(8, 1));
        assert_eq!(DevId::parse("259:0").unwrap().kernel(), mkdev(259, 0));
        for bad in [
            "", ":", "8", "8:", ":1", "+8:1", "8:-1", " 8:1", "8:1\n", "8:1:2", "4096:0",
        ] {
            assert_eq!(DevId::parse(bad), None, "{bad:?}");
        }
        assert_eq!(DevId::parse("0:1048576"), None, "minor wider than 20 bits");
    }

    #[test]
    fn stat_numbers_use_the_userspace_encoding() {
        // glibc's makedev(259, 65536): minor bits above 8 live above the major.
        let dev = libc::makedev(259, 65536);
        assert_eq!(DevId::from_stat(dev), DevId::new(259, 65536));
    }

    proptest! {
        #[test]
        fn never_panics(s in ".*") {
            let _ = DevId::parse(&s);
        }

        #[test]
        fn round_trips(major in 0..=MAX_MAJOR, minor in 0..=MAX_MINOR) {
            let d = DevId::new(major, minor).unwrap();
            prop_assert_eq!(DevId::parse(&d.to_string()), Some(d));
            prop_assert_eq!(DevId::from_stat(libc::makedev(major, minor)), Some(d));
        }

        #[test]
        fn out_of_range_is_rejected(major in (MAX_MAJOR + 1).., minor in (MAX_MINOR + 1)..) {
            prop_assert_eq!(DevId::parse(&format!("{major}:0")), None);
            prop_assert_eq!(DevId::parse(&format!("0:{minor}")), None);
        }
    }
}
