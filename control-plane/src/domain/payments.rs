//! The words of payments, each spelt once: the gateways (`Channel`), how an order is paid
//! (`PayMethod`, the `orders.channel` column), an order's status and what became of a gateway
//! notification. The spellings are those of the database, the JSON and the metric labels.

use std::fmt;

/// Declares a closed set of words with the one spelling each has in the database, JSON and
/// metric labels: `as_str`, `FromStr`, `Display` and serde both ways.
macro_rules! words {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
        }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownWord;

            fn from_str(s: &str) -> Result<$name, UnknownWord> {
                match s {
                    $($text => Ok($name::$variant),)*
                    _ => Err(UnknownWord { kind: stringify!($name), word: s.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

/// A word that is not one of its kind's.
#[derive(Debug, thiserror::Error)]
#[error("{word:?} is not a {kind}")]
pub struct UnknownWord {
    pub kind: &'static str,
    pub word: String,
}

words! {
    /// A payment gateway (`payment_notifications.channel`, the `channel` metric label).
    Channel {
        Alipay = "alipay",
        Wechat = "wechat",
    }
}

words! {
    /// How an order is paid (`orders.channel`, the `channel` of `POST /v1/orders`).
    PayMethod {
        /// Alipay's PC cashier page.
        AlipayPage = "alipay_page",
        /// Alipay's mobile H5 cashier.
        AlipayWap = "alipay_wap",
        /// WeChat Pay Native: a QR code of the `code_url`.
        WechatNative = "wechat_native",
    }
}

words! {
    /// An order's status (`orders.status`, the `status` label of the orders metric).
    OrderStatus {
        Pending = "pending",
        Paid = "paid",
        Closed = "closed",
        Refunded = "refunded",
    }
}

words! {
    /// What became of a payment notification (`payment_notifications.result`, the `result`
    /// metric label).
    NotificationResult {
        /// Stored, not yet acted on.
        Received = "received",
        /// It paid its order.
        Processed = "processed",
        /// Its order was already paid.
        Duplicate = "duplicate",
        /// Verified but not a payment (e.g. a trade that closed).
        Ignored = "ignored",
        /// Did not verify, or did not match its order.
        Rejected = "rejected",
    }
}

impl PayMethod {
    /// The gateway that takes this kind of payment.
    pub fn channel(self) -> Channel {
        match self {
            PayMethod::AlipayPage | PayMethod::AlipayWap => Channel::Alipay,
            PayMethod::WechatNative => Channel::Wechat,
        }
    }
}

impl OrderStatus {
    /// Paid for, whatever happened since: a payment for it changes nothing.
    pub fn is_settled(self) -> bool {
        matches!(self, OrderStatus::Paid | OrderStatus::Refunded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_parses_back() {
        fn check<T: std::str::FromStr + Copy + PartialEq + fmt::Debug + fmt::Display>(all: &[T]) {
            for w in all {
                assert_eq!(w.to_string().parse::<T>().ok(), Some(*w), "{w}");
            }
        }
        check(Channel::ALL);
        check(PayMethod::ALL);
        check(OrderStatus::ALL);
        check(NotificationResult::ALL);
        assert!("alipay".parse::<PayMethod>().is_err());
        assert_eq!(PayMethod::AlipayWap.channel(), Channel::Alipay);
        assert_eq!(
            serde_json::to_string(&OrderStatus::Refunded).expect("json"),
            r#""refunded""#
        );
    }
}
