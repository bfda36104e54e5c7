-- How long a tenant's audit records are kept, beyond the platform's minimum (0 = the minimum).
-- On the tenants row, which a deletion only marks: a deleted tenant's records keep their rule.
ALTER TABLE tenants ADD COLUMN audit_retention_days INTEGER NOT NULL DEFAULT 0;

-- Legal holds: while one is set, no record it covers is purged, whatever its age.
CREATE TABLE audit_holds (
    -- A tenant's id (its records), or 'platform' (the whole log).
    scope   TEXT PRIMARY KEY,
    reason  TEXT NOT NULL,
    set_by  TEXT NOT NULL,
    set_at  TEXT NOT NULL
);
