//! Who is consuming: the (stream, group, consumer) triple that names one consume loop in
//! Redis, in log lines and in the handler's environment.

/// One consumer of one group of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Consumer {
    pub(crate) stream: String,
    pub(crate) group: String,
    pub(crate) name: String,
}

impl Consumer {
    pub(crate) fn new(stream: &str, group: &str, name: &str) -> Self {
        Consumer {
            stream: stream.to_owned(),
            group: group.to_owned(),
            name: name.to_owned(),
        }
    }
}
