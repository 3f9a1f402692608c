//! `choices!`: an enum of a job file's named choices, defined once with the
//! name each variant has in the file. It gives `NAMES` (the list
//! `fields.rs` validates against and the template prints), `name()` and
//! `parse()`, so the accepted names and the parsing cannot disagree.

/// Defines a `Copy` enum whose variants are written in job files as the
/// given strings.
///
/// ```ignore
/// choices! {
///     /// `train.loss`.
///     pub enum Loss { /// squared error
///         L2 = "l2", Huber = "huber" }
/// }
/// assert_eq!(Loss::parse("huber"), Some(Loss::Huber));
/// ```
macro_rules! choices {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every name a job file may give, in the order of the variants.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The name a job file gives it.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }

            /// From the job file's name (`None` for a name not in [`Self::NAMES`]).
            pub fn parse(name: &str) -> Option<Self> {
                match name {
                    $($text => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

pub(crate) use choices;
