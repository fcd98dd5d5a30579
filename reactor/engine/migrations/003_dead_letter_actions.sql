-- What people did to dead letters (replay, discard, purge), from the dashboard or
-- `reactor dlq`: one row per action, written in the same transaction as the action
-- itself, so a row exists exactly when the action took effect. Kept (not pruned by
-- reactor.prune_history): it is the operators' audit trail.
CREATE TABLE IF NOT EXISTS reactor.dead_letter_actions (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    action       text        NOT NULL CHECK (action IN ('replay', 'discard', 'purge')),
    queue        text        NOT NULL,
    -- The dead letters acted on (their ids in <queue>_dlq), the original messages'
    -- ids, and for a replay the ids of the new messages on <queue>, index by index.
    dlq_ids      bigint[]    NOT NULL,
    msg_ids      bigint[]    NOT NULL,
    new_msg_ids  bigint[],
    -- Which filter chose them (a reason text, or null for "by id"), who asked
    -- (the dashboard's client address, or `cli` and the user) and why.
    filter       text,
    client       text        NOT NULL,
    note         text
);
CREATE INDEX IF NOT EXISTS dead_letter_actions_queue_at_idx
    ON reactor.dead_letter_actions (queue, at DESC);
REVOKE ALL ON reactor.dead_letter_actions FROM PUBLIC;
