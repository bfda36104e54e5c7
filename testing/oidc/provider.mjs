#!/usr/bin/env node
// Local OpenID Connect provider for Palisade's federation integration tests.
//
// Wraps panva/oidc-provider (OpenID Certified) with:
//   * static clients and accounts read from a JSON config file,
//   * a minimal, non-interactive-friendly login page (one HTML form POST),
//   * automatic consent (no consent screen),
//   * PKCE (S256 only) required for every authorization request,
//   * scope-requested claims (email, groups, ...) included in the ID Token.
//
// Usage:
//   node provider.mjs --config <file.json> [--port <n>] [--host <addr>]
//                     [--tls-cert <pem> --tls-key <pem>] [--exit-on-stdin-close]
//
// Port: --port, else $OIDC_PORT, else 0 (= an ephemeral port chosen by the OS).
// When ready, exactly one line is written to stdout:
//   OIDC-ISSUER <issuer-url>
// Everything else (oidc-provider notices, warnings, errors) goes to stderr.
// See README.md for the config format and the HTTP steps of a login.

import { randomBytes, generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import { parseArgs } from 'node:util';

// Keep stdout reserved for the single OIDC-ISSUER line: oidc-provider prints
// its NOTICEs with console.info / console.log.
console.info = console.error; // eslint-disable-line no-console
console.log = console.error; // eslint-disable-line no-console

const { default: Provider, errors } = await import('oidc-provider');

function die(msg) {
  process.stderr.write(`oidc test provider: ${msg}\n`);
  process.exit(2);
}

// ---------------------------------------------------------------- arguments
let args;
try {
  ({ values: args } = parseArgs({
    options: {
      config: { type: 'string' },
      port: { type: 'string' },
      host: { type: 'string', default: '127.0.0.1' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      'exit-on-stdin-close': { type: 'boolean', default: false },
    },
    allowPositionals: false,
  }));
} catch (e) {
  die(e.message);
}
if (!args.config) die('--config <file.json> is required');
const portArg = args.port ?? process.env.OIDC_PORT ?? '0';
const port = Number.parseInt(portArg, 10);
if (!Number.isInteger(port) || port < 0 || port > 65535 || String(port) !== String(portArg).trim()) {
  die(`invalid port ${JSON.stringify(portArg)}`);
}
if (Boolean(args['tls-cert']) !== Boolean(args['tls-key'])) {
  die('--tls-cert and --tls-key must be given together');
}
const tls = Boolean(args['tls-cert']);

// ------------------------------------------------------------------- config
let config;
try {
  config = JSON.parse(readFileSync(args.config, 'utf8'));
} catch (e) {
  die(`cannot read config ${args.config}: ${e.message}`);
}
if (!Array.isArray(config.clients) || config.clients.length === 0) die('config: "clients" must be a non-empty array');
if (!Array.isArray(config.accounts) || config.accounts.length === 0) die('config: "accounts" must be a non-empty array');

// Scope -> claims released for it. `openid` always yields `sub`.
const claimsByScope = config.claims_by_scope ?? {
  openid: ['sub'],
  email: ['email', 'email_verified'],
  profile: ['name', 'preferred_username', 'given_name', 'family_name'],
  groups: ['groups'],
};

// Clients: oidc-provider client metadata; defaults make a public client
// (no secret) using the authorization code flow. Any other metadata
// (client_secret + token_endpoint_auth_method for a confidential client,
// post_logout_redirect_uris, ...) is passed through unchanged.
const clients = config.clients.map((c, i) => {
  if (!c.client_id) die(`config: clients[${i}].client_id missing`);
  if (!Array.isArray(c.redirect_uris) || c.redirect_uris.length === 0) die(`config: clients[${i}].redirect_uris missing`);
  return {
    token_endpoint_auth_method: 'none',
    grant_types: ['authorization_code'],
    response_types: ['code'],
    id_token_signed_response_alg: 'RS256',
    ...c,
  };
});

// Accounts: { username, password, sub?, claims: { email, groups, ... } }.
const accountsByUsername = new Map();
const accountsBySub = new Map();
config.accounts.forEach((a, i) => {
  if (typeof a.username !== 'string' || !a.username) die(`config: accounts[${i}].username missing`);
  if (typeof a.password !== 'string') die(`config: accounts[${i}].password missing`);
  const sub = a.sub ?? a.username;
  const acct = { sub, username: a.username, password: a.password, claims: a.claims ?? {} };
  accountsByUsername.set(a.username, acct);
  accountsBySub.set(sub, acct);
});

// --------------------------------------------------------------- provider
function ephemeralSigningKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: `test-${randomBytes(6).toString('hex')}`, use: 'sig', alg: 'RS256' };
}

function buildProvider(issuer) {
  const provider = new Provider(issuer, {
    clients,
    jwks: { keys: [ephemeralSigningKey()] },
    cookies: {
      keys: [randomBytes(32).toString('hex')],
      // lax instead of the default "none": no ".legacy" duplicate cookies,
      // and no Secure requirement over plain-HTTP loopback.
      long: { httpOnly: true, sameSite: 'lax', signed: true },
      short: { httpOnly: true, sameSite: 'lax', signed: true },
    },
    claims: claimsByScope,
    // explicit TTLs (seconds); also silences oidc-provider's "default ttl" notices
    ttl: {
      AuthorizationCode: 60,
      AccessToken: 3600,
      IdToken: 3600,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
    },
    // Put scope-requested claims (email, groups, ...) in the ID Token too,
    // not only in the UserInfo response.
    conformIdTokenClaims: false,
    pkce: { methods: ['S256'], required: () => true },
    features: {
      devInteractions: { enabled: false },
      // keep the discovery document small and predictable
      introspection: { enabled: false },
      revocation: { enabled: false },
    },
    interactions: {
      url: (ctx, interaction) => `/interaction/${interaction.uid}`,
    },
    // Auto-consent: grant whatever OIDC scopes/claims the client requested,
    // so the only interaction is the login form.
    async loadExistingGrant(ctx) {
      const { oidc } = ctx;
      const accountId = oidc.session?.accountId;
      if (!accountId) return undefined;
      const grantId = oidc.result?.consent?.grantId || oidc.session.grantIdFor(oidc.client.clientId);
      let grant = grantId ? await oidc.provider.Grant.find(grantId) : undefined;
      if (!grant) grant = new oidc.provider.Grant({ clientId: oidc.client.clientId, accountId });
      if (oidc.params.scope) grant.addOIDCScope(oidc.params.scope);
      const requestedClaims = [];
      for (const where of ['id_token', 'userinfo']) {
        if (oidc.claims?.[where]) requestedClaims.push(...Object.keys(oidc.claims[where]));
      }
      if (requestedClaims.length) grant.addOIDCClaims(requestedClaims);
      await grant.save();
      return grant;
    },
    async findAccount(ctx, sub) {
      const acct = accountsBySub.get(sub);
      if (!acct) return undefined;
      return {
        accountId: acct.sub,
        // oidc-provider filters these by the granted scopes/claims
        async claims() { return { ...acct.claims, sub: acct.sub }; },
      };
    },
    renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Error', `<pre id="error">${esc(JSON.stringify(out, null, 2))}</pre>`);
    },
  });
  // Behind nothing: the test talks to the listening socket directly.
  provider.proxy = false;

  for (const ev of ['server_error', 'authorization.error', 'grant.error', 'userinfo.error',
    'end_session.error', 'discovery.error', 'jwks.error']) {
    provider.on(ev, (...a) => {
      const err = a.find((x) => x instanceof Error);
      process.stderr.write(`oidc test provider: ${ev}: ${err ? `${err.name}: ${err.message}${err.error_description ? ` (${err.error_description})` : ''}${err.error_detail ? ` [${err.error_detail}]` : ''}` : ''}\n`);
    });
  }
  return provider;
}

// ----------------------------------------------------------- interactions
function esc(s) {
  return String(s).replace(/[&<>"']/g, (ch) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  }[ch]));
}

function page(title, body) {
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${esc(title)}</title></head><body>\n${body}\n</body></html>\n`;
}

function loginPage(uid, clientId, error) {
  return page('Sign-in', [
    `<h1>Sign-in to ${esc(clientId)}</h1>`,
    error ? `<p id="error">${esc(error)}</p>` : '',
    `<form id="login" method="post" action="/interaction/${esc(uid)}/login">`,
    '<input type="text" name="username" autofocus>',
    '<input type="password" name="password">',
    '<button type="submit">Sign-in</button>',
    '</form>',
    `<form id="abort" method="post" action="/interaction/${esc(uid)}/abort"><button type="submit">Cancel</button></form>`,
  ].join('\n'));
}

function send(res, status, html) {
  res.writeHead(status, {
    'Content-Type': 'text/html; charset=utf-8',
    'Cache-Control': 'no-store',
    'Content-Length': Buffer.byteLength(html),
  });
  res.end(html);
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new Error('form body too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

async function autoConsent(provider, req, res, details) {
  const { prompt: { details: missing }, grantId, session, params } = details;
  const grant = grantId ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  return provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } }, {
    mergeWithLastSubmission: true,
  });
}

async function handleInteraction(provider, req, res, url) {
  const m = url.pathname.match(/^\/interaction\/([^/]+)(?:\/(login|abort))?\/?$/);
  if (!m) return send(res, 404, page('Not found', '<p>not found</p>'));
  const [, uid, action] = m;
  try {
    const details = await provider.interactionDetails(req, res);
    if (details.uid !== uid) throw new errors.SessionNotFound('interaction uid mismatch');
    const clientId = details.params.client_id;

    if (!action) {
      if (req.method !== 'GET') return send(res, 405, page('Error', '<p>method not allowed</p>'));
      if (details.prompt.name === 'consent') {
        // Only reached when consent is forced (prompt=consent): auto-grant it.
        return autoConsent(provider, req, res, details);
      }
      if (details.prompt.name !== 'login') {
        return send(res, 501, page('Error', `<p>unexpected prompt ${esc(details.prompt.name)}</p>`));
      }
      return send(res, 200, loginPage(uid, clientId));
    }
    if (req.method !== 'POST') return send(res, 405, page('Error', '<p>method not allowed</p>'));

    if (action === 'abort') {
      return provider.interactionFinished(req, res, {
        error: 'access_denied',
        error_description: 'End-User aborted interaction',
      }, { mergeWithLastSubmission: false });
    }

    // action === 'login'
    const form = await readForm(req);
    const acct = accountsByUsername.get(form.get('username') ?? '');
    if (!acct || acct.password !== (form.get('password') ?? '')) {
      return send(res, 401, loginPage(uid, clientId, 'Invalid username or password.'));
    }
    return provider.interactionFinished(req, res, {
      login: { accountId: acct.sub, amr: ['pwd'] },
    }, { mergeWithLastSubmission: false });
  } catch (e) {
    const status = e instanceof errors.SessionNotFound ? 400 : 500;
    if (status === 500) process.stderr.write(`oidc test provider: interaction error: ${e.stack}\n`);
    return send(res, status, page('Error', `<pre id="error">${esc(e.name)}: ${esc(e.message)}</pre>`));
  }
}

// ----------------------------------------------------------------- server
let onRequest = (req, res) => send(res, 503, page('Starting', '<p>starting</p>'));
const server = tls
  ? https.createServer({ cert: readFileSync(args['tls-cert']), key: readFileSync(args['tls-key']) },
    (req, res) => onRequest(req, res))
  : http.createServer((req, res) => onRequest(req, res));

server.on('error', (e) => die(`cannot listen on ${args.host}:${port}: ${e.message}`));
server.listen(port, args.host, async () => {
  const { port: actual } = server.address();
  const host = args.host.includes(':') ? `[${args.host}]` : args.host;
  const issuer = `${tls ? 'https' : 'http'}://${host}:${actual}`;
  let provider;
  try {
    provider = buildProvider(issuer);
    // static clients are only validated when first looked up: do it now so a
    // bad config fails at startup instead of during the test's first request
    for (const c of clients) {
      if (!await provider.Client.find(c.client_id)) throw new Error(`client ${c.client_id} not loaded`);
    }
  } catch (e) {
    die(`invalid configuration: ${e.error_description ?? e.message}`);
  }
  const callback = provider.callback();
  onRequest = (req, res) => {
    const url = new URL(req.url, issuer);
    if (url.pathname === '/interaction' || url.pathname.startsWith('/interaction/')) {
      handleInteraction(provider, req, res, url);
    } else {
      callback(req, res);
    }
  };
  process.stdout.write(`OIDC-ISSUER ${issuer}\n`);
});

function shutdown() {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (args['exit-on-stdin-close']) {
  process.stdin.on('end', shutdown);
  process.stdin.on('close', shutdown);
  process.stdin.resume();
}
