-- Platform-wide Cedar policies written by the security administrator. They may only forbid:
-- grants come from the role table alone, so no policy can merge administration and audit.
CREATE TABLE platform_policies (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    text        TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
