//! Money: integer minor units inside, decimal text at the edges, never `f64`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An ISO 4217 currency and the number of decimals its minor unit has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Currency {
    code: [u8; 3],
    decimals: u8,
}

/// Why a text is not a supported currency.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a supported currency (supported: {SUPPORTED})")]
pub struct CurrencyError(pub String);

const SUPPORTED: &str = "USD, EUR, GBP, CHF, JPY, KWD";

impl Currency {
    /// US dollar, two decimals.
    pub const USD: Currency = Currency {
        code: *b"USD",
        decimals: 2,
    };

    /// Parse an ISO 4217 code this build knows.
    pub fn parse(code: &str) -> Result<Self, CurrencyError> {
        let decimals = match code {
            "USD" | "EUR" | "GBP" | "CHF" => 2,
            "JPY" => 0,
            "KWD" => 3,
            _ => return Err(CurrencyError(code.to_owned())),
        };
        let mut c = [0u8; 3];
        c.copy_from_slice(code.as_bytes());
        Ok(Self { code: c, decimals })
    }

    /// The ISO code.
    pub fn code(&self) -> &str {
        std::str::from_utf8(&self.code).expect("codes are ASCII")
    }

    /// Decimals of the minor unit (2 for USD, 0 for JPY).
    pub fn decimals(&self) -> u8 {
        self.decimals
    }

    /// Format `minor` units as decimal text: `35000` USD → `"350.00"`.
    pub fn format(&self, minor: i64) -> String {
        let sign = if minor < 0 { "-" } else { "" };
        let abs = minor.unsigned_abs();
        if self.decimals == 0 {
            return format!("{sign}{abs}");
        }
        let unit = 10u64.pow(self.decimals.into());
        format!(
            "{sign}{}.{:0width$}",
            abs / unit,
            abs % unit,
            width = self.decimals as usize
        )
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = String::deserialize(d)?;
        Currency::parse(&code).map_err(serde::de::Error::custom)
    }
}

/// A signed amount of one currency, in minor units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

impl Money {
    /// Zero of `currency`.
    pub fn zero(currency: Currency) -> Self {
        Self { minor: 0, currency }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.currency.format(self.minor))
    }
}

/// A strictly positive amount no larger than the configured maximum: what a deposit or
/// a withdrawal moves. Only [`AmountPolicy::parse`] makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Amount(Money);

impl Amount {
    /// Minor units (always > 0).
    pub fn minor(&self) -> i64 {
        self.0.minor
    }

    /// The currency.
    pub fn currency(&self) -> Currency {
        self.0.currency
    }

    /// As signed money.
    pub fn money(&self) -> Money {
        self.0
    }

    /// An amount accepted before and stored (a transfer's), or `None` unless positive.
    /// The policy's maximum was checked when it was accepted, and is not again.
    pub fn accepted(minor: i64, currency: Currency) -> Option<Self> {
        (minor > 0).then_some(Self(Money { minor, currency }))
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a text is not an acceptable amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("`{0}` is not a decimal number")]
    NotANumber(String),
    #[error("the amount must be greater than zero")]
    Zero,
    #[error("the amount must not be negative")]
    Negative,
    #[error("{currency} amounts have at most {decimals} decimal places")]
    TooPrecise { currency: String, decimals: u8 },
    #[error("the amount is larger than the maximum of {max}")]
    TooLarge { max: String },
}

/// The rules an amount must meet: its currency and the largest accepted value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AmountPolicy {
    pub currency: Currency,
    /// The largest accepted amount, in minor units.
    pub max_minor: i64,
}

impl AmountPolicy {
    /// A policy for `currency` accepting at most `max_minor` minor units.
    pub fn new(currency: Currency, max_minor: i64) -> Self {
        Self {
            currency,
            max_minor,
        }
    }

    /// The maximum as decimal text.
    pub fn max_text(&self) -> String {
        self.currency.format(self.max_minor)
    }

    /// Parse decimal text in JSON number syntax (`500`, `500.00`, `5e2`) exactly, without
    /// going through floating point.
    pub fn parse(&self, text: &str) -> Result<Amount, AmountError> {
        let not_a_number = || AmountError::NotANumber(text.chars().take(40).collect());
        let decimal = Decimal::parse(text).ok_or_else(not_a_number)?;
        if decimal.digits.iter().all(|d| *d == 0) {
            return Err(AmountError::Zero);
        }
        if decimal.negative {
            return Err(AmountError::Negative);
        }
        let too_large = || AmountError::TooLarge {
            max: self.max_text(),
        };
        // value = digits * 10^(-scale); minor = value * 10^decimals
        let shift = i64::from(self.currency.decimals) - decimal.scale;
        let mut digits = decimal.digits.as_slice();
        if shift < 0 {
            let cut = usize::try_from(-shift).unwrap_or(usize::MAX);
            let keep = digits.len().saturating_sub(cut);
            if digits[keep..].iter().any(|d| *d != 0) {
                return Err(AmountError::TooPrecise {
                    currency: self.currency.code().to_owned(),
                    decimals: self.currency.decimals,
                });
            }
            digits = &digits[..keep];
        }
        let mut minor: i64 = 0;
        for d in digits {
            minor = minor
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(*d)))
                .ok_or_else(too_large)?;
        }
        for _ in 0..shift.max(0) {
            minor = minor.checked_mul(10).ok_or_else(too_large)?;
        }
        if minor > self.max_minor {
            return Err(too_large());
        }
        Ok(Amount(Money {
            minor,
            currency: self.currency,
        }))
    }
}

/// An exact decimal: `digits × 10^(-scale)`.
struct Decimal {
    negative: bool,
    digits: Vec<u8>,
    scale: i64,
}

impl Decimal {
    /// Parse the JSON number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn parse(text: &str) -> Option<Self> {
        let b = text.as_bytes();
        let mut i = 0;
        let negative = b.first() == Some(&b'-');
        if negative {
            i += 1;
        }
        let int_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let int = &b[int_start..i];
        if int.is_empty() || (int.len() > 1 && int[0] == b'0') {
            return None;
        }
        let mut frac: &[u8] = &[];
        if i < b.len() && b[i] == b'.' {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            frac = &b[start..i];
            if frac.is_empty() {
                return None;
            }
        }
        let mut exp: i64 = 0;
        if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
            i += 1;
            let exp_negative = match b.get(i) {
                Some(b'-') => {
                    i += 1;
                    true
                }
                Some(b'+') => {
                    i += 1;
                    false
                }
                _ => false,
            };
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                // Saturate: an exponent beyond ±10^6 is either too large or too precise.
                exp = (exp * 10 + i64::from(b[i] - b'0')).min(1_000_000);
                i += 1;
            }
            if i == start {
                return None;
            }
            if exp_negative {
                exp = -exp;
            }
        }
        if i != b.len() {
            return None;
        }
        let mut digits: Vec<u8> = int.iter().chain(frac).map(|d| d - b'0').collect();
        let lead = digits.iter().take_while(|d| **d == 0).count();
        digits.drain(..lead.min(digits.len().saturating_sub(1)));
        Some(Self {
            negative,
            digits,
            scale: frac.len() as i64 - exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> AmountPolicy {
        AmountPolicy::new(Currency::USD, 1_000_000_00)
    }

    #[test]
    fn decimal_text_becomes_exact_minor_units() {
        let p = usd();
        assert_eq!(p.parse("500.00").unwrap().minor(), 50_000);
        assert_eq!(p.parse("500").unwrap().minor(), 50_000);
        assert_eq!(p.parse("0.01").unwrap().minor(), 1);
        assert_eq!(p.parse("5e2").unwrap().minor(), 50_000);
        assert_eq!(p.parse("1.5E1").unwrap().minor(), 1_500);
        assert_eq!(p.parse("12.300").unwrap().minor(), 1_230);
        assert_eq!(p.parse("1000000.00").unwrap().minor(), 100_000_000);
        assert_eq!(p.parse("0.1").unwrap().minor(), 10);
    }

    #[test]
    fn zero_negative_over_precise_huge_and_non_numbers_are_rejected() {
        let p = usd();
        assert_eq!(p.parse("0"), Err(AmountError::Zero));
        assert_eq!(p.parse("0.00"), Err(AmountError::Zero));
        assert_eq!(p.parse("-0"), Err(AmountError::Zero));
        assert_eq!(p.parse("-5"), Err(AmountError::Negative));
        assert!(matches!(
            p.parse("0.001"),
            Err(AmountError::TooPrecise { .. })
        ));
        assert!(matches!(
            p.parse("1e-3"),
            Err(AmountError::TooPrecise { .. })
        ));
        assert!(matches!(
            p.parse("1000000.01"),
            Err(AmountError::TooLarge { .. })
        ));
        assert!(matches!(
            p.parse("1e400"),
            Err(AmountError::TooLarge { .. })
        ));
        assert!(matches!(
            p.parse("99999999999999999999999999"),
            Err(AmountError::TooLarge { .. })
        ));
        for bad in [
            "NaN",
            "Infinity",
            "-Infinity",
            "",
            "1.",
            ".5",
            "01",
            "+1",
            "1e",
            "1,5",
            " 1",
            "0x10",
        ] {
            assert!(
                matches!(p.parse(bad), Err(AmountError::NotANumber(_))),
                "{bad:?} must not parse"
            );
        }
    }

    #[test]
    fn minor_units_format_as_decimal_text() {
        assert_eq!(Currency::USD.format(35_000), "350.00");
        assert_eq!(Currency::USD.format(5), "0.05");
        assert_eq!(Currency::USD.format(-120), "-1.20");
        assert_eq!(Currency::parse("JPY").unwrap().format(120), "120");
        assert_eq!(Currency::parse("KWD").unwrap().format(1_234), "1.234");
    }
}
