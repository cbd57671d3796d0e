//! The tar headers of a one-entry archive (a regular file streamed by `download`, or a symlink
//! as a link): GNU format, with `././@LongLink` entries for a name or target longer than the
//! 100 bytes of the classic fields. Directories come whole from the appliance's `tar-out`.

/// What one entry is.
pub struct Entry<'a> {
    pub name: &'a [u8],
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    pub kind: Kind<'a>,
}

pub enum Kind<'a> {
    File { size: u64 },
    Symlink { target: &'a [u8] },
}

const BLOCK: usize = 512;

fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let s = format!("{value:0width$o}");
    let s = s.as_bytes();
    if s.len() > width {
        // GNU base-256 for sizes of 8 GiB and more.
        field.fill(0);
        field[0] = 0x80;
        let bytes = value.to_be_bytes();
        let n = field.len();
        field[n - 8..].copy_from_slice(&bytes);
        return;
    }
    field[..width].copy_from_slice(s);
    field[width] = 0;
}

fn raw_header(name: &[u8], typeflag: u8, size: u64, e: &Entry<'_>, link: &[u8]) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    octal(&mut h[100..108], u64::from(e.mode & 0o7777));
    octal(&mut h[108..116], e.uid);
    octal(&mut h[116..124], e.gid);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], e.mtime.max(0) as u64);
    h[156] = typeflag;
    let l = link.len().min(100);
    h[157..157 + l].copy_from_slice(&link[..l]);
    h[257..265].copy_from_slice(b"ustar  \0");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

fn long(out: &mut Vec<u8>, flag: u8, value: &[u8], e: &Entry<'_>) {
    let mut v = value.to_vec();
    v.push(0);
    out.extend_from_slice(&raw_header(b"././@LongLink", flag, v.len() as u64, e, b""));
    out.extend_from_slice(&v);
    out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
}

/// The header block(s) of `e`; a file's data follows, then [`padding`].
pub fn header(e: &Entry<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    if e.name.len() > 100 {
        long(&mut out, b'L', e.name, e);
    }
    let (flag, size, link): (u8, u64, &[u8]) = match e.kind {
        Kind::File { size } => (b'0', size, b""),
        Kind::Symlink { target } => (b'2', 0, target),
    };
    if link.len() > 100 {
        long(&mut out, b'K', link, e);
    }
    out.extend_from_slice(&raw_header(e.name, flag, size, e, link));
    out
}

/// Zeroes after `size` bytes of data up to the block, then the two end-of-archive blocks.
pub fn trailer(size: u64) -> Vec<u8> {
    let pad = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
    vec![0u8; pad + 2 * BLOCK]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn gnu_tar_reads_a_long_symlink_and_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let name = vec![b'n'; 150];
        let target = b"../../../etc/passwd".repeat(8);
        let e = Entry {
            name: &name,
            mode: 0o777,
            uid: 1,
            gid: 2,
            mtime: 1_700_000_000,
            kind: Kind::Symlink { target: &target },
        };
        let mut t = header(&e);
        t.extend(trailer(0));
        let p = dir.path().join("a.tar");
        std::fs::write(&p, &t).unwrap();
        let out = Command::new("tar").arg("tvf").arg(&p).output().unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{s} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(s.starts_with("lrwxrwxrwx 1/2"), "{s}");
        assert!(
            s.contains(&String::from_utf8_lossy(&target).to_string()),
            "{s}"
        );

        let e = Entry {
            name: b"f\xff",
            mode: 0o640,
            uid: 0,
            gid: 0,
            mtime: 0,
            kind: Kind::File { size: 3 },
        };
        let mut t = header(&e);
        t.extend_from_slice(b"abc");
        t.extend(trailer(3));
        std::fs::write(&p, &t).unwrap();
        let x = dir.path().join("x");
        std::fs::create_dir(&x).unwrap();
        let st = Command::new("tar")
            .arg("xf")
            .arg(&p)
            .arg("-C")
            .arg(&x)
            .status()
            .unwrap();
        assert!(st.success());
        use std::os::unix::ffi::OsStrExt;
        let got = std::fs::read(x.join(std::ffi::OsStr::from_bytes(b"f\xff"))).unwrap();
        assert_eq!(got, b"abc");
    }
}
