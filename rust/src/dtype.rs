//! Element types of the safetensors format.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    F4,
    F6E2M3,
    F6E3M2,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    F8E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

const ALL: [(Dtype, &str, u32); 20] = [
    (Dtype::Bool, "BOOL", 8),
    (Dtype::F4, "F4", 4),
    (Dtype::F6E2M3, "F6_E2M3", 6),
    (Dtype::F6E3M2, "F6_E3M2", 6),
    (Dtype::U8, "U8", 8),
    (Dtype::I8, "I8", 8),
    (Dtype::F8E5M2, "F8_E5M2", 8),
    (Dtype::F8E4M3, "F8_E4M3", 8),
    (Dtype::F8E8M0, "F8_E8M0", 8),
    (Dtype::I16, "I16", 16),
    (Dtype::U16, "U16", 16),
    (Dtype::F16, "F16", 16),
    (Dtype::BF16, "BF16", 16),
    (Dtype::I32, "I32", 32),
    (Dtype::U32, "U32", 32),
    (Dtype::F32, "F32", 32),
    (Dtype::C64, "C64", 64),
    (Dtype::F64, "F64", 64),
    (Dtype::I64, "I64", 64),
    (Dtype::U64, "U64", 64),
];

impl Dtype {
    pub fn parse(name: &str) -> Option<Dtype> {
        ALL.iter().find(|(_, n, _)| *n == name).map(|(d, _, _)| *d)
    }

    pub fn name(self) -> &'static str {
        ALL.iter().find(|(d, _, _)| *d == self).map(|(_, n, _)| *n).unwrap()
    }

    pub fn bits(self) -> u32 {
        ALL.iter().find(|(d, _, _)| *d == self).map(|(_, _, b)| *b).unwrap()
    }

    /// Bytes per element, or `None` for the packed sub-byte types whose elements have no byte address.
    pub fn item_bytes(self) -> Option<u64> {
        let bits = self.bits();
        (bits % 8 == 0).then_some(u64::from(bits / 8))
    }

    /// Bytes taken by `numel` elements, or `None` when that is not a whole number of bytes or overflows.
    pub fn span_bytes(self, numel: u64) -> Option<u64> {
        let bits = numel.checked_mul(u64::from(self.bits()))?;
        (bits % 8 == 0).then_some(bits / 8)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (dtype, name, _) in ALL {
            assert_eq!(Dtype::parse(name), Some(dtype));
            assert_eq!(dtype.name(), name);
        }
        assert_eq!(Dtype::parse("F128"), None);
    }

    #[test]
    fn sub_byte_spans() {
        assert_eq!(Dtype::F4.span_bytes(4), Some(2));
        assert_eq!(Dtype::F4.span_bytes(3), None);
        assert_eq!(Dtype::F4.item_bytes(), None);
        assert_eq!(Dtype::BF16.span_bytes(3), Some(6));
        assert_eq!(Dtype::F64.span_bytes(u64::MAX), None);
    }
}
