//! Format 2 entries in the chain verifier: every stored field is covered, erased
//! entries verify by their stored commitment, and chains go from format 1 to 2.

use pgseal_core::canonical::canonical_payload;
use pgseal_core::chain::{Payload, Problem, Report, StoredEntry, Verifier};
use pgseal_core::keys::SecretKey;
use pgseal_core::ledger::{
    entry_hash, entry_hash_v2, payload_commitment, EntryFields, EntryFieldsV2, EntryMac, Hash,
    FMT_V1, FMT_V2, GENESIS,
};

/// One stored entry, owned.
#[derive(Clone, Debug)]
struct Row {
    fmt: i16,
    seq: i64,
    actor: String,
    event: String,
    payload: Option<String>,
    db_role: Option<String>,
    subjects: Option<Vec<String>>,
    salt: Option<Vec<u8>>,
    commitment: Option<Vec<u8>>,
    prev: Vec<u8>,
    hash: Vec<u8>,
    mac: Vec<u8>,
}

const TENANT: &str = "acme";

fn mac() -> EntryMac {
    EntryMac::new(&SecretKey::from_slice(&[5u8; 32]).unwrap())
}

impl Row {
    fn view(&self) -> StoredEntry<'_> {
        StoredEntry {
            fmt: self.fmt,
            tenant: TENANT,
            seq: self.seq,
            recorded_at_us: self.seq * 1000,
            actor: &self.actor,
            event: &self.event,
            payload: self.payload.as_deref().map(Payload::Json),
            db_role: self.db_role.as_deref(),
            subjects: self.subjects.as_deref(),
            salt: self.salt.as_deref(),
            commitment: self.commitment.as_deref(),
            prev_hash: &self.prev,
            hash: &self.hash,
            mac: Some(&self.mac),
        }
    }
}

/// A format 1 entry after `prev`.
fn v1(seq: i64, prev: &Hash) -> Row {
    let payload = format!("{{\"n\": {seq}}}");
    let hash = entry_hash(&EntryFields {
        prev_hash: prev,
        tenant: TENANT,
        seq,
        recorded_at_us: seq * 1000,
        actor: "alice",
        event: "e",
        payload: &canonical_payload(&payload).unwrap(),
    });
    Row {
        fmt: FMT_V1,
        seq,
        actor: "alice".into(),
        event: "e".into(),
        payload: Some(payload),
        db_role: None,
        subjects: None,
        salt: None,
        commitment: None,
        prev: prev.to_vec(),
        hash: hash.to_vec(),
        mac: mac().sign(&hash).to_vec(),
    }
}

/// A format 2 entry after `prev`, with two subjects; erased when `erased`.
fn v2(seq: i64, prev: &Hash, erased: bool) -> Row {
    let payload = format!("{{\"n\": {seq}, \"email\": \"a@example.com\"}}");
    let salt = [seq as u8; 32];
    let commitment = payload_commitment(&salt, &canonical_payload(&payload).unwrap());
    let subjects = vec!["user:1".to_owned(), format!("user:{seq}")];
    let hash = entry_hash_v2(&EntryFieldsV2 {
        prev_hash: prev,
        tenant: TENANT,
        seq,
        recorded_at_us: seq * 1000,
        actor: "alice",
        db_role: "app_rw",
        event: "e",
        subjects: &subjects,
        commitment: &commitment,
    });
    Row {
        fmt: FMT_V2,
        seq,
        actor: "alice".into(),
        event: "e".into(),
        payload: (!erased).then_some(payload),
        db_role: Some("app_rw".into()),
        subjects: Some(subjects),
        salt: (!erased).then(|| salt.to_vec()),
        commitment: erased.then(|| commitment.to_vec()),
        prev: prev.to_vec(),
        hash: hash.to_vec(),
        mac: mac().sign(&hash).to_vec(),
    }
}

/// A chain of the given formats ('1', '2', or 'x' for an erased format 2 entry).
fn chain(formats: &str) -> Vec<Row> {
    let mut prev = GENESIS;
    let mut out = Vec::new();
    for (i, f) in formats.chars().enumerate() {
        let seq = i as i64 + 1;
        let row = match f {
            '1' => v1(seq, &prev),
            '2' => v2(seq, &prev, false),
            'x' => v2(seq, &prev, true),
            other => panic!("unknown format {other}"),
        };
        prev = row.hash.clone().try_into().unwrap();
        out.push(row);
    }
    out
}

fn verify(rows: &[Row]) -> Report {
    let mut v = Verifier::new(1, GENESIS, Some(mac()));
    for r in rows {
        v.push(&r.view());
    }
    v.finish(None)
}

fn failure(rows: &[Row]) -> Option<(i64, Problem)> {
    verify(rows).failure.map(|f| (f.seq, f.problem))
}

#[test]
fn format_1_then_format_2_verifies() {
    let r = verify(&chain("1112x2"));
    assert!(r.ok(), "{r:?}");
    assert_eq!((r.checked, r.erased), (6, 1));
}

#[test]
fn format_1_after_format_2_is_refused() {
    let mut rows = chain("12");
    let prev: Hash = rows[1].hash.clone().try_into().unwrap();
    rows.push(v1(3, &prev));
    assert_eq!(failure(&rows), Some((3, Problem::HashMismatch)));
}

#[test]
fn an_erased_entry_verifies_by_its_commitment_and_a_tampered_one_fails() {
    let rows = chain("2x2");
    let r = verify(&rows);
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.erased, 1);
    let mut bad = rows.clone();
    bad[1].commitment.as_mut().unwrap()[0] ^= 1;
    assert_eq!(failure(&bad), Some((2, Problem::HashMismatch)));
    // A commitment of the wrong length.
    let mut short = rows.clone();
    short[1].commitment.as_mut().unwrap().pop();
    assert_eq!(failure(&short), Some((2, Problem::HashMismatch)));
    // Erased without a stored commitment.
    let mut none = rows;
    none[1].commitment = None;
    assert_eq!(failure(&none), Some((2, Problem::HashMismatch)));
}

#[test]
fn every_stored_format_2_field_is_covered() {
    let rows = chain("222");
    type Edit = fn(&mut Row);
    let edits: [(&str, Edit); 12] = [
        ("db_role", |r| r.db_role = Some("app_ro".into())),
        ("db_role dropped", |r| r.db_role = None),
        ("salt", |r| r.salt.as_mut().unwrap()[31] ^= 1),
        ("salt dropped", |r| r.salt = None),
        ("subject edited", |r| {
            r.subjects.as_mut().unwrap()[0].push('x')
        }),
        ("subject added", |r| {
            r.subjects.as_mut().unwrap().push("user:9".into())
        }),
        ("subjects swapped", |r| {
            r.subjects.as_mut().unwrap().swap(0, 1)
        }),
        ("subjects dropped", |r| r.subjects = None),
        ("payload", |r| r.payload = Some("{\"n\": 2}".into())),
        ("payload dropped", |r| r.payload = None),
        ("fmt 1", |r| r.fmt = FMT_V1),
        ("fmt 3", |r| r.fmt = 3),
    ];
    for (what, edit) in edits {
        let mut t = rows.clone();
        edit(&mut t[1]);
        assert_eq!(failure(&t), Some((2, Problem::HashMismatch)), "{what}");
    }
    // A stored commitment next to salt and payload must be theirs.
    let mut t = rows.clone();
    let mut c = t[1].commitment.take().unwrap_or_else(|| vec![0u8; 32]);
    c[0] ^= 1;
    t[1].commitment = Some(c);
    assert_eq!(failure(&t), Some((2, Problem::HashMismatch)));
    // The MAC covers the format 2 hash.
    let mut t = rows;
    t[1].mac[0] ^= 1;
    assert_eq!(failure(&t), Some((2, Problem::MacMismatch)));
}

#[test]
fn a_format_1_entry_takes_no_format_2_field() {
    let rows = chain("11");
    type Edit = fn(&mut Row);
    let edits: [(&str, Edit); 5] = [
        ("db_role", |r| r.db_role = Some("app".into())),
        ("subjects", |r| r.subjects = Some(vec!["user:1".into()])),
        ("salt", |r| r.salt = Some(vec![0; 32])),
        ("commitment", |r| r.commitment = Some(vec![0; 32])),
        ("payload dropped", |r| r.payload = None),
    ];
    for (what, edit) in edits {
        let mut t = rows.clone();
        edit(&mut t[1]);
        assert_eq!(failure(&t), Some((2, Problem::HashMismatch)), "{what}");
    }
    // An empty subjects list is the same as none.
    let mut t = rows;
    t[1].subjects = Some(Vec::new());
    assert!(verify(&t).ok());
}
