//! Devices extracted into a [`DeviceSink`] of the caller's.

use std::io;
use std::sync::{Arc, Mutex};

use vma_reader::{DeviceSink, Extractor, Zeroing};
use vma_testkit::{sha256_hex, vectors};

/// A device image in memory, with a record of what was asked of it.
#[derive(Default)]
struct Recorded {
    bytes: Vec<u8>,
    zero_requests: u64,
    finished: bool,
}

struct MemSink(Arc<Mutex<Recorded>>);

impl DeviceSink for MemSink {
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut r = self.0.lock().unwrap();
        let end = offset as usize + data.len();
        assert!(end <= r.bytes.len(), "a write past the device end");
        r.bytes[offset as usize..end].copy_from_slice(data);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let mut r = self.0.lock().unwrap();
        let end = (offset + len) as usize;
        assert!(end <= r.bytes.len(), "zeroes past the device end");
        r.bytes[offset as usize..end].fill(0);
        r.zero_requests += 1;
        Ok(())
    }

    fn finish(self: Box<Self>) -> io::Result<()> {
        self.0.lock().unwrap().finished = true;
        Ok(())
    }
}

/// Every device of every vector through a sink, over garbage, with and without zeroing:
/// the sink then holds the image exactly (with zeroing) or wherever the image has data.
#[test]
fn every_vector_device_through_a_sink() {
    for v in vectors() {
        let archive = v.bytes();
        let header = vma_format::ArchiveHeader::decode(&archive).unwrap();
        for zeroing in [Zeroing::WriteZeros, Zeroing::AssumeZeroed] {
            let write_zero = zeroing == Zeroing::WriteZeros;
            let dir = tempfile::tempdir().unwrap();
            let mut extractor = Extractor::new(dir.path())
                .configs(false)
                .devices(Vec::<String>::new());
            let mut recorded = Vec::new();
            for d in header.devices.iter().filter(|d| !d.is_vmstate()) {
                let fill = if write_zero { 0xa5 } else { 0 };
                let r = Arc::new(Mutex::new(Recorded {
                    bytes: vec![fill; d.size as usize],
                    ..Recorded::default()
                }));
                extractor = extractor.target_sink(
                    &d.name,
                    format!("/sink/{}", d.name),
                    Box::new(MemSink(r.clone())),
                    zeroing,
                );
                recorded.push((d.name.clone(), r));
            }
            let report = extractor.extract(&archive[..]).unwrap();
            assert!(
                std::fs::read_dir(dir.path()).unwrap().next().is_none(),
                "{}: a sink device makes no file",
                v.file
            );
            for (name, r) in recorded {
                let r = r.lock().unwrap();
                assert!(r.finished, "{}: {name} finished", v.file);
                let want = v.file(&format!("disk-{name}.raw")).unwrap();
                assert_eq!(sha256_hex(&r.bytes), want.sha256, "{}: {name}", v.file);
                let file = report.files.iter().find(|f| f.name == name).unwrap();
                assert!(file.in_place);
            }
        }
    }
}

struct FailingSink;

impl DeviceSink for FailingSink {
    fn write_at(&mut self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("the image went away"))
    }
    fn write_zeroes(&mut self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::other("the image went away"))
    }
    fn finish(self: Box<Self>) -> io::Result<()> {
        panic!("a failed extraction must not finish its sinks")
    }
}

#[test]
fn a_failing_sink_fails_the_extraction_naming_its_label() {
    let v = vectors()
        .into_iter()
        .find(|v| v.file.starts_with("vec1"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fail_into = |device: &str, label: &str| {
        Extractor::new(dir.path())
            .target_sink(device, label, Box::new(FailingSink), Zeroing::WriteZeros)
            .extract(&v.bytes()[..])
            .unwrap_err()
    };
    let msg = fail_into("drive-scsi0", "/images/x.qcow2").to_string();
    assert!(
        msg.contains("/images/x.qcow2") && msg.contains("went away"),
        "{msg}"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing left"
    );
    let err = fail_into("drive-nope", "/x");
    assert!(err.to_string().contains("drive-nope"), "{err}");
}
