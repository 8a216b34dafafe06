-- outbox-relay schema, migration 5: the audit trail of operator actions on dead letters.
CREATE TABLE __SCHEMA__.audit_log (
    audit_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,   -- who (an option, or the OS user)
    action      text        NOT NULL,   -- replay | discard
    source      text        NOT NULL,   -- relay | inbox
    target      text        NOT NULL,   -- the dead letter's id
    why         text,
    details     jsonb       NOT NULL DEFAULT '{}'::jsonb  -- what was changed (never the payload)
);
CREATE INDEX audit_log_at ON __SCHEMA__.audit_log (at);
