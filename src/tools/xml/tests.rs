use proptest::prelude::*;

use super::*;

const GOOD: &str = r#"<?xml version="1.0"?>
<!-- a comment -->
<superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="128" nr_data_blocks="1024">
  <device dev_id="1" mapped_blocks="3" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
    <single_mapping origin_block="5" data_block="48" time="1"></single_mapping>
  </device>
  <device dev_id="2" mapped_blocks="0" transaction="1" creation_time="0" snap_time="0"/>
</superblock>
"#;

fn err_of(xml: &str) -> XmlError {
    match scan(xml.as_bytes()) {
        Ok(s) => panic!("accepted: {s:?}"),
        Err(e) => e,
    }
}

fn with_mapping(m: &str) -> String {
    format!(
        "<superblock uuid=\"\" time=\"1\" transaction=\"2\" data_block_size=\"128\" nr_data_blocks=\"100\">\n<device dev_id=\"1\" mapped_blocks=\"1\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n{m}\n</device>\n</superblock>\n"
    )
}

#[test]
fn a_document_with_declaration_comments_and_empty_elements_parses() {
    let (head, pool) = parse(GOOD.as_bytes()).expect("parse");
    assert_eq!(head.nr_data_blocks, 1024);
    assert_eq!(pool.devices.len(), 2);
    let d1 = &pool.devices[&1];
    assert_eq!(d1.mappings.len(), 3);
    assert_eq!(d1.mappings[&5], BlockTime { block: 48, time: 1 });
    assert!(pool.devices[&2].mappings.is_empty());
    let s = scan(GOOD.as_bytes()).expect("scan");
    assert_eq!((s.devices, s.mappings, s.runs), (2, 3, 2));
}

#[test]
fn entities_in_the_uuid_are_decoded_and_escaping_inverts_them() {
    let xml = GOOD.replace("uuid=\"\"", "uuid=\"a&amp;b&#x41;&lt;\"");
    let (head, _) = parse(xml.as_bytes()).expect("parse");
    assert_eq!(head.uuid, "a&bA<");
    assert_eq!(escape_attr("a&b\"<"), "a&amp;b&quot;&lt;");
}

#[test]
fn errors_name_their_line() {
    let e = err_of(&with_mapping(
        "<single_mapping origin_block=\"1\" data_block=\"x\" time=\"0\"/>",
    ));
    assert_eq!(e.line, 3);
    assert!(matches!(
        e.kind,
        XmlErrorKind::BadNumber {
            attr: "data_block",
            ..
        }
    ));
    assert!(e.to_string().starts_with("line 3: data_block=\"x\""));
}

#[test]
fn structural_mistakes_are_refused() {
    type Expect = fn(&XmlErrorKind) -> bool;
    let cases: &[(&str, Expect)] = &[
        ("", |k| matches!(k, XmlErrorKind::NoSuperblock)),
        ("<device/>", |k| matches!(k, XmlErrorKind::Misplaced { .. })),
        ("<superblock time=\"1\"", |k| {
            matches!(k, XmlErrorKind::UnexpectedEof(_))
        }),
        ("<bogus/>", |k| matches!(k, XmlErrorKind::UnknownElement(_))),
        ("<!DOCTYPE x>", |k| matches!(k, XmlErrorKind::Syntax(_))),
        ("hello", |k| matches!(k, XmlErrorKind::Text(_))),
    ];
    for (xml, ok) in cases {
        let e = err_of(xml);
        assert!(ok(&e.kind), "{xml:?}: {e}");
    }
    let trailing = format!("{GOOD}<superblock/>");
    assert!(matches!(
        err_of(&trailing).kind,
        XmlErrorKind::TrailingContent
    ));
    let unclosed = GOOD.replace("</superblock>", "");
    assert!(matches!(
        err_of(&unclosed).kind,
        XmlErrorKind::UnexpectedEof(_)
    ));
    let mismatched = GOOD.replacen("</device>", "</superblock>", 1);
    assert!(matches!(
        err_of(&mismatched).kind,
        XmlErrorKind::MismatchedClose { .. }
    ));
}

#[test]
fn attribute_mistakes_are_refused() {
    let missing = GOOD.replace(" snap_time=\"1\"", "");
    assert!(matches!(
        err_of(&missing).kind,
        XmlErrorKind::MissingAttribute {
            attr: "snap_time",
            ..
        }
    ));
    let unknown = GOOD.replace("snap_time=\"1\"", "snap_time=\"1\" colour=\"red\"");
    assert!(matches!(
        err_of(&unknown).kind,
        XmlErrorKind::UnknownAttribute { .. }
    ));
    let twice = GOOD.replace("snap_time=\"1\"", "snap_time=\"1\" snap_time=\"1\"");
    assert!(matches!(
        err_of(&twice).kind,
        XmlErrorKind::DuplicateAttribute(_)
    ));
    let negative = GOOD.replace("time=\"1\" transaction", "time=\"-1\" transaction");
    assert!(matches!(
        err_of(&negative).kind,
        XmlErrorKind::BadNumber { .. }
    ));
    let wide = GOOD.replace("time=\"1\" transaction", "time=\"4294967296\" transaction");
    assert!(
        matches!(err_of(&wide).kind, XmlErrorKind::BadNumber { max, .. } if max == u64::from(u32::MAX))
    );
    let entity = GOOD.replace("uuid=\"\"", "uuid=\"&nbsp;\"");
    assert!(matches!(err_of(&entity).kind, XmlErrorKind::BadEntity(_)));
    let long_uuid = GOOD.replace("uuid=\"\"", "uuid=\"0123456789abcdefg\"");
    assert!(matches!(err_of(&long_uuid).kind, XmlErrorKind::UuidTooLong));
    let dbs = GOOD.replace("data_block_size=\"128\"", "data_block_size=\"100\"");
    assert!(matches!(
        err_of(&dbs).kind,
        XmlErrorKind::BadDataBlockSize(100)
    ));
}

#[test]
fn mapping_mistakes_are_refused() {
    let m = |a: &str| err_of(&with_mapping(a)).kind;
    assert!(matches!(
        m("<range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"0\" time=\"0\"/>"),
        XmlErrorKind::ZeroLength
    ));
    assert!(matches!(
        m("<range_mapping origin_begin=\"18446744073709551615\" data_begin=\"0\" length=\"2\" time=\"0\"/>"),
        XmlErrorKind::Overflow { .. }
    ));
    assert!(matches!(
        m("<range_mapping origin_begin=\"0\" data_begin=\"99\" length=\"2\" time=\"0\"/>"),
        XmlErrorKind::DataOutOfRange { end: 101, .. }
    ));
    assert!(matches!(
        m("<single_mapping origin_block=\"0\" data_block=\"1\" time=\"16777216\"/>"),
        XmlErrorKind::TimeTooLarge(16_777_216)
    ));
    assert!(matches!(
        m("<single_mapping origin_block=\"5\" data_block=\"1\" time=\"0\"/>\n<single_mapping origin_block=\"5\" data_block=\"2\" time=\"0\"/>"),
        XmlErrorKind::OutOfOrder { vblock: 5, prev_end: 6 }
    ));
    assert!(matches!(
        m("<single_mapping origin_block=\"5\" data_block=\"1\" time=\"0\"><device/></single_mapping>"),
        XmlErrorKind::Misplaced { .. }
    ));
}

#[test]
fn devices_are_unique_and_within_the_kernels_ids() {
    let dup = GOOD.replace("dev_id=\"2\"", "dev_id=\"1\"");
    assert!(matches!(
        err_of(&dup).kind,
        XmlErrorKind::DuplicateDevice(1)
    ));
    let big = GOOD.replace("dev_id=\"2\"", "dev_id=\"16777216\"");
    assert!(matches!(err_of(&big).kind, XmlErrorKind::DevIdTooLarge(_)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any byte flipped, removed or inserted: an error or a document, never a panic.
    #[test]
    fn mutated_documents_never_panic(pos in 0usize..GOOD.len(), byte in any::<u8>(), op in 0u8..3) {
        let mut v = GOOD.as_bytes().to_vec();
        match op {
            0 => v[pos] = byte,
            1 => { v.remove(pos); }
            _ => v.insert(pos, byte),
        }
        let _ = scan(&v);
        let _ = parse(&v);
    }

    /// Arbitrary bytes after a valid prefix.
    #[test]
    fn arbitrary_tails_never_panic(cut in 0usize..GOOD.len(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut v = GOOD.as_bytes()[..cut].to_vec();
        v.extend_from_slice(&tail);
        let _ = scan(&v);
    }
}
