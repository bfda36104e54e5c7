-- Tenant networks: VPCs, subnets with their ACLs, security groups with their rules, and the
-- instances' ports. Addresses and prefixes are stored in their canonical text form.

CREATE TABLE vpcs (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    name        TEXT NOT NULL,
    cidr        TEXT NOT NULL,
    -- The VXLAN network identifier; on each host also the VPC's conntrack zone (1-65535).
    vni         INTEGER NOT NULL UNIQUE CHECK (vni BETWEEN 1 AND 65535),
    created_at  TEXT NOT NULL,
    UNIQUE (tenant_id, name)
);

CREATE TABLE subnets (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    vpc_id      TEXT NOT NULL REFERENCES vpcs(id),
    name        TEXT NOT NULL,
    cidr        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (vpc_id, name)
);

-- A subnet's network ACL, in order (first match wins); none = everything passes.
CREATE TABLE acl_rules (
    subnet_id   TEXT NOT NULL REFERENCES subnets(id),
    position    INTEGER NOT NULL,
    direction   TEXT NOT NULL CHECK (direction IN ('ingress', 'egress')),
    action      TEXT NOT NULL CHECK (action IN ('allow', 'deny')),
    protocol    TEXT NOT NULL CHECK (protocol IN ('any', 'tcp', 'udp', 'icmp')),
    port_from   INTEGER,
    port_to     INTEGER,
    cidr        TEXT NOT NULL,
    PRIMARY KEY (subnet_id, position)
);

CREATE TABLE security_groups (
    id           TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL REFERENCES tenants(id),
    name         TEXT NOT NULL,
    description  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    UNIQUE (tenant_id, name)
);

-- A rule names a far end: a prefix, or the ports of a group of the same tenant.
CREATE TABLE sg_rules (
    id               TEXT PRIMARY KEY,
    group_id         TEXT NOT NULL REFERENCES security_groups(id),
    direction        TEXT NOT NULL CHECK (direction IN ('ingress', 'egress')),
    protocol         TEXT NOT NULL CHECK (protocol IN ('any', 'tcp', 'udp', 'icmp')),
    port_from        INTEGER,
    port_to          INTEGER,
    cidr             TEXT,
    remote_group_id  TEXT REFERENCES security_groups(id),
    created_at       TEXT NOT NULL,
    CHECK ((cidr IS NULL) <> (remote_group_id IS NULL))
);
CREATE INDEX sg_rules_by_group ON sg_rules (group_id);

-- One port per instance today; it lives and dies with its instance.
CREATE TABLE ports (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants(id),
    instance_id   TEXT NOT NULL UNIQUE REFERENCES instances(id),
    vpc_id        TEXT NOT NULL REFERENCES vpcs(id),
    subnet_id     TEXT NOT NULL REFERENCES subnets(id),
    mac           TEXT NOT NULL UNIQUE,
    ip            TEXT NOT NULL,
    ingress_kbit  INTEGER NOT NULL DEFAULT 0,
    egress_kbit   INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL,
    UNIQUE (subnet_id, ip)
);

CREATE TABLE port_groups (
    port_id   TEXT NOT NULL REFERENCES ports(id),
    group_id  TEXT NOT NULL REFERENCES security_groups(id),
    PRIMARY KEY (port_id, group_id)
);
CREATE INDEX port_groups_by_group ON port_groups (group_id);
