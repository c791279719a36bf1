//! The pgoutput decoder is total: arbitrary bytes, and valid messages with
//! bytes flipped or cut off, decode to a message or an error, never a panic.

use evictd::internal::pgoutput::{decode, Message};
use proptest::prelude::*;

/// A few valid messages to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let mut relation = vec![b'R'];
    relation.extend(16384_u32.to_be_bytes());
    relation.extend(b"public\0orders\0");
    relation.push(b'f');
    relation.extend(2_u16.to_be_bytes());
    for (name, oid) in [("id", 20_u32), ("user_id", 20)] {
        relation.push(1);
        relation.extend(name.as_bytes());
        relation.push(0);
        relation.extend(oid.to_be_bytes());
        relation.extend((-1_i32).to_be_bytes());
    }
    let mut update = vec![b'U'];
    update.extend(16384_u32.to_be_bytes());
    update.push(b'O');
    update.extend(2_u16.to_be_bytes());
    update.extend([b't', 0, 0, 0, 1, b'7', b'n']);
    update.push(b'N');
    update.extend(2_u16.to_be_bytes());
    update.extend([b't', 0, 0, 0, 1, b'7', b'u']);
    let mut commit = vec![b'C', 0];
    commit.extend([0_u8; 24]);
    let mut truncate = vec![b'T'];
    truncate.extend(2_u32.to_be_bytes());
    truncate.push(1);
    truncate.extend(1_u32.to_be_bytes());
    truncate.extend(2_u32.to_be_bytes());
    vec![relation, update, commit, truncate]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), in_stream in any::<bool>()) {
        let _ = decode(&bytes, in_stream);
    }

    #[test]
    fn mutated_messages_never_panic(
        seed in 0..4_usize,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in any::<usize>(),
        in_stream in any::<bool>(),
    ) {
        let mut bytes = seeds()[seed].clone();
        for (at, value) in flips {
            let at = at % bytes.len();
            bytes[at] = value;
        }
        let cut = cut % (bytes.len() + 1);
        if let Ok(Message::Update { old: Some((_, old)), new, .. }) = decode(&bytes[..cut], in_stream) {
            // Decoded tuples yield exactly their declared number of values.
            prop_assert_eq!(old.values().count(), old.len());
            prop_assert_eq!(new.values().count(), new.len());
        }
    }
}

#[test]
fn the_seeds_are_valid() {
    for seed in seeds() {
        decode(&seed, false).unwrap_or_else(|e| panic!("{e}"));
    }
}
