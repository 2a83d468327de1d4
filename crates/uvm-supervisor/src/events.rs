//! The VM's events, each with a sequence number (1, 2, 3, … with no gaps), kept in a ring of the
//! last [`KEPT`]: state transitions (with their reasons), the boot phases of a start (each step
//! as it finished) and exec starts and exits. A client resumes with `since` = the last number it
//! saw: nothing missed, nothing twice. Transitions are taken from the controller's history
//! before any other event is appended, so an event never precedes the transition that allowed
//! it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use uvm_api::v1::events_response::Event;
use uvm_api::{v1, ApiError};

use crate::supervisor::Shared;

/// How many events are kept (the proto promises at least 1024).
pub(crate) const KEPT: usize = 1024;

/// The ring of events and the newest sequence number.
#[derive(Debug)]
pub(crate) struct EventLog {
    ring: Mutex<VecDeque<v1::EventsResponse>>,
    newest: watch::Sender<u64>,
    /// How many controller transitions were turned into events already.
    transitions_seen: Mutex<usize>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            ring: Mutex::new(VecDeque::with_capacity(KEPT)),
            newest: watch::channel(0).0,
            transitions_seen: Mutex::new(0),
        }
    }
}

impl EventLog {
    /// Appends `event` with the next sequence number.
    pub(crate) fn push(&self, event: Event) {
        let mut ring = uvm_util::lock(&self.ring);
        let sequence = *self.newest.borrow() + 1;
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(v1::EventsResponse {
            sequence,
            time: Some(uvm_api::convert::timestamp(SystemTime::now())),
            event: Some(event),
        });
        // Under the ring's lock: a reader never sees a number whose event is not there yet.
        self.newest.send_replace(sequence);
    }

    /// The newest sequence number (0 before the first event).
    pub(crate) fn newest(&self) -> u64 {
        *self.newest.borrow()
    }

    /// Turns the controller's transitions not seen yet into events. `history` is the
    /// controller's (oldest first); a VM makes a handful of transitions in its life, far fewer
    /// than the controller keeps, so counting them is enough to find the new ones.
    pub(crate) fn transitions(&self, history: &[uvm::Transition], reason: Option<v1::Reason>) {
        let mut seen = uvm_util::lock(&self.transitions_seen);
        for t in history.iter().skip(*seen) {
            let mut transition = v1::Transition::from(t.clone());
            transition.reason = reason
                .clone()
                .filter(|_| matches!(t.to, uvm::State::Terminated | uvm::State::Invalid));
            transition.time = Some(uvm_api::convert::timestamp(SystemTime::now()));
            self.push(Event::Transition(transition));
        }
        *seen = (*seen).max(history.len());
    }

    /// Appends `event` after the transitions of `history` not seen yet, so that nothing that
    /// happened because of a transition (an exec on a Running VM) precedes it in sequence order.
    pub(crate) fn push_after(
        &self,
        history: &[uvm::Transition],
        reason: Option<v1::Reason>,
        event: Event,
    ) {
        self.transitions(history, reason);
        self.push(event);
    }

    /// The kept events after `since`, or why they cannot be delivered.
    fn after(&self, since: u64) -> Result<Vec<v1::EventsResponse>, ApiError> {
        let ring = uvm_util::lock(&self.ring);
        let newest = self.newest();
        if since > newest {
            return Err(ApiError::InvalidRequest {
                what: "events since",
                message: format!("{since} is beyond the newest event, {newest}"),
            });
        }
        let oldest = ring.front().map_or(newest + 1, |e| e.sequence);
        if since + 1 < oldest {
            return Err(ApiError::EventsExpired { since, oldest });
        }
        Ok(ring
            .iter()
            .filter(|e| e.sequence > since)
            .cloned()
            .collect())
    }
}

/// The Events stream: what is kept after `since`, then (with `follow`) new events until the VM is
/// removed.
pub(crate) fn events(
    shared: Arc<Shared>,
    request: &v1::EventsRequest,
) -> Result<ReceiverStream<Result<v1::EventsResponse, Status>>, Status> {
    let first = shared.events.after(request.since)?;
    let (tx, rx) = mpsc::channel(64);
    let follow = request.follow;
    // The follower continues after the last event sent, or after the request's `since`.
    let mut last = first.last().map_or(request.since, |e| e.sequence);
    // Subscribed before the first batch is sent: an event pushed meanwhile is not missed.
    let mut newest = shared.events.newest.subscribe();
    tokio::spawn(async move {
        for event in first {
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        if !follow {
            return;
        }
        loop {
            tokio::select! {
                r = newest.changed() => if r.is_err() { return },
                () = shared.removed.cancelled() => return,
                () = tx.closed() => return,
            }
            let batch = match shared.events.after(last) {
                Ok(batch) => batch,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            for event in batch {
                last = event.sequence;
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec_started(exec_id: u64) -> Event {
        Event::ExecStarted(v1::ExecStartedEvent {
            exec_id,
            pid: 1,
            args: vec!["true".into()],
            terminal: false,
        })
    }

    fn sequences(events: &[v1::EventsResponse]) -> Vec<u64> {
        events.iter().map(|e| e.sequence).collect()
    }

    #[test]
    fn a_since_beyond_the_newest_is_invalid_and_one_before_the_oldest_kept_is_out_of_range() {
        let log = EventLog::default();
        assert!(matches!(log.after(1), Err(ApiError::InvalidRequest { .. })));
        for i in 0..(KEPT as u64 + 10) {
            log.push(exec_started(i));
        }
        let err = log.after(5).expect_err("expired");
        assert!(
            matches!(
                err,
                ApiError::EventsExpired {
                    since: 5,
                    oldest: 11
                }
            ),
            "{err:?}"
        );
        assert_eq!(log.after(10).expect("the oldest kept onwards").len(), KEPT);
    }

    #[test]
    fn sequence_numbers_start_at_1_without_gaps_and_resume_after_since() {
        let log = EventLog::default();
        assert_eq!(log.after(0).expect("empty"), Vec::new());
        for i in 0..5 {
            log.push(exec_started(i));
        }
        assert_eq!(sequences(&log.after(0).expect("all")), [1, 2, 3, 4, 5]);
        assert_eq!(sequences(&log.after(3).expect("resumed")), [4, 5]);
        assert_eq!(log.after(5).expect("none new"), Vec::new());
        assert_eq!(log.newest(), 5);
    }

    #[test]
    fn an_exec_start_comes_after_the_transition_to_running_not_yet_written_down() {
        use uvm::{Operation, State};
        let log = EventLog::default();
        let t = |from, to, operation| uvm::Transition {
            from,
            to,
            operation,
        };
        let mut history = vec![t(State::NotCreated, State::Created, Operation::Create)];
        log.transitions(&history, None);
        // Start committed Running; its caller has not synced the transitions yet when an exec
        // on the now Running VM starts.
        history.push(t(State::Created, State::Running, Operation::Start));
        log.push_after(&history, None, exec_started(1));
        log.transitions(&history, None);
        let events = log.after(0).expect("all");
        assert_eq!(sequences(&events), [1, 2, 3]);
        assert!(
            matches!(&events[1].event, Some(Event::Transition(t)) if t.to_state() == v1::State::Running),
            "{:?}",
            events[1]
        );
        assert!(matches!(&events[2].event, Some(Event::ExecStarted(_))));
    }

    #[test]
    fn each_controller_transition_becomes_one_event_with_its_reason_at_the_end() {
        let log = EventLog::default();
        let t = |from, to, operation| uvm::Transition {
            from,
            to,
            operation,
        };
        use uvm::{Operation, State};
        let mut history = vec![t(State::NotCreated, State::Created, Operation::Create)];
        log.transitions(&history, None);
        log.transitions(&history, None);
        history.push(t(State::Created, State::Running, Operation::Start));
        history.push(t(State::Running, State::Terminated, Operation::Terminate));
        let reason = v1::Reason {
            description: "terminated on request".into(),
            ..v1::Reason::default()
        };
        log.transitions(&history, Some(reason));
        let events = log.after(0).expect("all");
        assert_eq!(sequences(&events), [1, 2, 3]);
        let Some(Event::Transition(last)) = &events[2].event else {
            panic!("{:?}", events[2]);
        };
        assert_eq!(last.to_state(), v1::State::Terminated);
        assert_eq!(
            last.reason.as_ref().map(|r| r.description.as_str()),
            Some("terminated on request")
        );
        let Some(Event::Transition(running)) = &events[1].event else {
            panic!("{:?}", events[1]);
        };
        assert!(running.reason.is_none());
    }
}
