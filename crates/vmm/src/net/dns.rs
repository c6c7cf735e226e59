//! The DNS side of the domain guard: which queries a guest may send on, and what of an
//! answer it gets back. Pure functions over wire-format messages (parsed with
//! `hickory-proto`), so they are tested without a VM; [`super::guard`] does the I/O.

use super::domains::domain_allowed;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RData;
use std::net::Ipv4Addr;

/// Largest DNS message the guard reads or sends (UDP with EDNS; larger answers are
/// truncated by the resolver and the guest's TCP retry is not served).
pub const MAX_DNS_MESSAGE: usize = 4096;

/// Shortest time an address learnt from an answer stays reachable: answers with a TTL of
/// 0 or a few seconds must still be usable for the connection that follows them.
pub const MIN_TTL: u32 = 30;

/// Longest time an address learnt from an answer stays reachable without a new answer.
pub const MAX_TTL: u32 = 3600;

/// Addresses an answer opens, each with how long (seconds).
pub type Learnt = Vec<(Ipv4Addr, u32)>;

/// What to do with a guest's query.
#[derive(Debug, PartialEq, Eq)]
pub enum Query {
    /// Send it to the resolver: its one question names an allowed domain (the name, lower
    /// case).
    Forward(String),
    /// Answer the guest with this message instead (NXDOMAIN for a name off the list,
    /// FORMERR for something that is not one plain query).
    Answer(Vec<u8>),
    /// Not a DNS query at all: drop it.
    Drop,
}

/// Decides on `bytes`, a guest's query, against `domains`.
pub fn judge_query(bytes: &[u8], domains: &[String]) -> Query {
    let Ok(q) = Message::from_vec(bytes) else { return Query::Drop };
    if q.message_type() != MessageType::Query {
        return Query::Drop;
    }
    let reply = |code: ResponseCode| {
        let mut r = q.clone();
        r.set_message_type(MessageType::Response).set_response_code(code).set_recursion_available(true);
        r.take_answers();
        r.to_vec().map_or(Query::Drop, Query::Answer)
    };
    match q.queries() {
        [one] => {
            let name = one.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
            if domain_allowed(domains, &name) {
                Query::Forward(name)
            } else {
                reply(ResponseCode::NXDomain)
            }
        }
        _ => reply(ResponseCode::FormErr),
    }
}

/// The resolver's answer `bytes` to query `id`, as the guest gets it, and the addresses
/// it opens with how long (seconds, within [`MIN_TTL`]..=[`MAX_TTL`]). A-records whose
/// address `reachable` refuses (a closed range the operator has not opened: DNS
/// rebinding) are taken out of the answer. `None` for what is not the answer to `id`.
pub fn filter_answer(bytes: &[u8], id: u16, reachable: impl Fn(Ipv4Addr) -> bool) -> Option<(Vec<u8>, Learnt)> {
    let mut m = Message::from_vec(bytes).ok()?;
    if m.id() != id || m.message_type() != MessageType::Response {
        return None;
    }
    let mut learnt = Vec::new();
    let kept: Vec<_> = m
        .take_answers()
        .into_iter()
        .filter(|r| match r.data() {
            RData::A(a) if reachable(a.0) => {
                learnt.push((a.0, r.ttl().clamp(MIN_TTL, MAX_TTL)));
                true
            }
            RData::A(a) => {
                tracing::info!(address = %a.0, name = %r.name(), "DNS guard: answer into a closed range removed");
                false
            }
            _ => true,
        })
        .collect();
    // Addresses in other sections (glue) are not learnt, so they stay unreachable.
    m.insert_answers(kept);
    Some((m.to_vec().ok()?, learnt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query as Question;
    use hickory_proto::rr::{rdata::A, Name, Record, RecordType};
    use std::str::FromStr;

    fn query(name: &str) -> Message {
        let mut m = Message::new();
        m.set_id(7).set_message_type(MessageType::Query).add_query(Question::query(Name::from_str(name).unwrap(), RecordType::A));
        m
    }

    #[test]
    fn only_listed_names_are_forwarded() {
        let list = vec!["example.com".to_owned(), "*.example.org".to_owned()];
        assert_eq!(judge_query(&query("Example.COM.").to_vec().unwrap(), &list), Query::Forward("example.com".into()));
        assert_eq!(judge_query(&query("a.example.org.").to_vec().unwrap(), &list), Query::Forward("a.example.org".into()));
        let Query::Answer(no) = judge_query(&query("evil.net.").to_vec().unwrap(), &list) else { panic!("not refused") };
        let no = Message::from_vec(&no).unwrap();
        assert_eq!((no.id(), no.response_code(), no.answers().len()), (7, ResponseCode::NXDomain, 0));
        assert_eq!(judge_query(b"\x00\x01garbage", &list), Query::Drop);
        let mut two = query("example.com.");
        two.add_query(Question::query(Name::from_str("evil.net.").unwrap(), RecordType::A));
        assert!(matches!(judge_query(&two.to_vec().unwrap(), &list), Query::Answer(_)));
    }

    #[test]
    fn answers_lose_closed_addresses_and_teach_the_rest() {
        let mut m = query("example.com.");
        m.set_message_type(MessageType::Response);
        let name = Name::from_str("example.com.").unwrap();
        m.add_answer(Record::from_rdata(name.clone(), 0, RData::A(A::new(93, 184, 216, 34))));
        m.add_answer(Record::from_rdata(name, 99_999, RData::A(A::new(10, 0, 0, 5))));
        let bytes = m.to_vec().unwrap();
        assert!(filter_answer(&bytes, 8, |_| true).is_none(), "another query's answer was taken");
        let (out, learnt) = filter_answer(&bytes, 7, |a| !a.is_private()).unwrap();
        assert_eq!(learnt, vec![(Ipv4Addr::new(93, 184, 216, 34), MIN_TTL)]);
        assert_eq!(Message::from_vec(&out).unwrap().answers().len(), 1);
        let (_, learnt) = filter_answer(&bytes, 7, |_| true).unwrap();
        assert_eq!(learnt[1].1, MAX_TTL);
    }
}
