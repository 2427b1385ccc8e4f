// TLS credential objects (QEMU's tls-creds-x509 and tls-creds-psk): files loaded at object-add, used by node:tls.
import { accessSync, readFileSync, constants as fsConstants } from 'node:fs';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import type { Daemon } from '../daemon.js';
import { genericError } from '../qapi/errors.js';
import { strerror } from '../util/errno.js';
import { secretString } from './secret.js';
import { expectPropertyEnum, expectPropertyType, objectsDaemon, userObjects, type UserObject } from './user-object.js';

export type TlsCredsEndpoint = 'client' | 'server';
export type TlsCredsType = 'tls-creds-x509' | 'tls-creds-psk';

/** TlsCredsX509Properties / TlsCredsPskProperties as object-add passes them (schema-checked). */
export interface TlsCredsOptions {
  dir?: string;
  endpoint?: TlsCredsEndpoint;
  'verify-peer'?: boolean;
  priority?: string;
  loaded?: boolean;
  /** x509 only. */
  'sanity-check'?: boolean;
  /** x509 only: secret holding the private key's password. */
  passwordid?: string;
  /** psk only: the identity a client presents (default 'qemu'). */
  username?: string;
}

/** QEMU's default PSK identity. */
const PSK_DEFAULT_USERNAME = 'qemu';

export class TlsCreds implements UserObject {
  /** PEM bytes, loaded at completion (x509). */
  ca?: Buffer;
  crl?: Buffer;
  cert?: Buffer;
  key?: Buffer;
  passphrase?: string;
  /** keys.psk: identity → key (psk). */
  pskKeys?: Map<string, Buffer>;

  constructor(readonly id: string, readonly qomType: TlsCredsType, readonly props: TlsCredsOptions) {}

  get endpoint(): TlsCredsEndpoint {
    return this.props.endpoint ?? 'client';
  }

  get verifyPeer(): boolean {
    return this.props['verify-peer'] ?? true;
  }

  getProperty(name: string): unknown {
    switch (name) {
      case 'dir': case 'priority': return this.props[name] ?? '';
      case 'endpoint': return this.endpoint;
      case 'verify-peer': return this.verifyPeer;
      case 'loaded': return true;
      case 'sanity-check': return this.qomType === 'tls-creds-x509' ? this.props['sanity-check'] ?? true : undefined;
      case 'passwordid': return this.qomType === 'tls-creds-x509' ? this.props.passwordid ?? '' : undefined;
      case 'username': return this.qomType === 'tls-creds-psk' ? this.props.username ?? '' : undefined;
      default: return undefined;
    }
  }

  /** QEMU's setters store the value; what was loaded at completion stays in use. */
  setProperty(name: string, value: unknown): boolean {
    const str = name === 'dir' || name === 'priority' || (name === 'passwordid' && this.qomType === 'tls-creds-x509') ||
      (name === 'username' && this.qomType === 'tls-creds-psk');
    const bool = name === 'verify-peer' || (name === 'sanity-check' && this.qomType === 'tls-creds-x509');
    if (str) {
      expectPropertyType(name, value, 'string');
      (this.props as Record<string, unknown>)[name] = value;
      return true;
    }
    if (bool) {
      expectPropertyType(name, value, 'boolean');
      (this.props as Record<string, unknown>)[name] = value;
      return true;
    }
    if (name === 'endpoint') {
      expectPropertyEnum(name, value, ['client', 'server']);
      this.props.endpoint = value;
      return true;
    }
    return false;
  }
}

/** QEMU's qcrypto_tls_creds_get_path: `dir/name`, which must be readable when required. */
function credsPath(dir: string, name: string, required: boolean): string | undefined {
  const path = `${dir}/${name}`;
  try {
    accessSync(path, fsConstants.R_OK);
    return path;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' && !required) return undefined;
    throw genericError(`Unable to access credentials ${path}: ${strerror(err)}`);
  }
}

function readPem(path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw genericError(`Unable to read ${path}: ${strerror(err)}`);
  }
}

/** The parts of QEMU's sanity check that catch real mistakes: unparsable files, a key that is not the certificate's. */
function sanityCheck(creds: TlsCreds, certPath: string | undefined, keyPath: string | undefined): void {
  const parse = (pem: Buffer, path: string) => {
    try {
      return new X509Certificate(pem);
    } catch {
      throw genericError(`Unable to import certificate ${path}`);
    }
  };
  const ca = parse(creds.ca!, `${creds.props.dir}/ca-cert.pem`);
  if (!ca.ca) throw genericError(`The certificate ${creds.props.dir}/ca-cert.pem basic constraints do not show a CA`);
  if (!creds.cert || !certPath) return;
  const cert = parse(creds.cert, certPath);
  if (cert.ca && creds.endpoint === 'server') {
    throw genericError(`The certificate ${certPath} basic constraints show a CA, but we need one for a server`);
  }
  if (!creds.key || !keyPath) return;
  let key;
  try {
    key = createPrivateKey({ key: creds.key, passphrase: creds.passphrase });
  } catch {
    throw genericError(`Unable to load certificate ${certPath} and key ${keyPath}`);
  }
  if (!cert.checkPrivateKey(key)) throw genericError(`Unable to load certificate ${certPath} and key ${keyPath}`);
}

function loadX509(daemon: Daemon, creds: TlsCreds): void {
  const { dir, passwordid } = creds.props;
  if (dir === undefined) throw genericError("Missing 'dir' property value");
  const caPath = credsPath(dir, 'ca-cert.pem', true)!;
  let certPath: string | undefined;
  let keyPath: string | undefined;
  if (creds.endpoint === 'server') {
    const crlPath = credsPath(dir, 'ca-crl.pem', false);
    certPath = credsPath(dir, 'server-cert.pem', true);
    keyPath = credsPath(dir, 'server-key.pem', true);
    if (crlPath) creds.crl = readPem(crlPath);
  } else {
    certPath = credsPath(dir, 'client-cert.pem', false);
    keyPath = credsPath(dir, 'client-key.pem', false);
  }
  if (passwordid !== undefined) creds.passphrase = secretString(daemon, passwordid);
  creds.ca = readPem(caPath);
  if (certPath && keyPath) {
    creds.cert = readPem(certPath);
    creds.key = readPem(keyPath);
  }
  if (creds.props['sanity-check'] ?? true) sanityCheck(creds, certPath, keyPath);
}

/** keys.psk: one `identity:hexkey` per line. */
function loadPsk(creds: TlsCreds): void {
  const { dir } = creds.props;
  if (dir === undefined) throw genericError("Missing 'dir' property value");
  const path = credsPath(dir, 'keys.psk', true)!;
  const keys = new Map<string, Buffer>();
  for (const line of readPem(path).toString('utf8').split('\n')) {
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    keys.set(line.slice(0, colon), Buffer.from(line.slice(colon + 1).trim(), 'hex'));
  }
  const username = creds.props.username ?? PSK_DEFAULT_USERNAME;
  if (creds.endpoint === 'client' && !keys.has(username)) {
    throw genericError(`Username ${username} not found in PSK file ${path}`);
  }
  creds.pskKeys = keys;
}

/** object-add's property-setting step: QEMU refuses 'loaded'. */
export function checkTlsCredsProperties(type: TlsCredsType, props: TlsCredsOptions): void {
  if (props.loaded !== undefined) throw genericError(`Property '${type}.loaded' is not writable`);
}

/** object-add's completion step: load the files from `dir` (QEMU's qcrypto_tls_creds_*_load). */
export function createTlsCreds(daemon: Daemon, type: TlsCredsType, id: string, props: TlsCredsOptions): TlsCreds {
  const creds = new TlsCreds(id, type, { ...props });
  if (type === 'tls-creds-x509') loadX509(daemon, creds);
  else loadPsk(creds);
  return creds;
}

/** QEMU's nbd_get_tls_creds / the nbd driver's lookup: credentials `id` for `endpoint`. */
export function lookupTlsCreds(id: string, endpoint: TlsCredsEndpoint, daemon = objectsDaemon()): TlsCreds {
  const obj = daemon ? userObjects(daemon).get(id) : undefined;
  if (!obj) {
    if (daemon?.objects.has(id)) throw genericError(`Object with id '${id}' is not TLS credentials`);
    throw genericError(`No TLS credentials with id '${id}'`);
  }
  if (!(obj instanceof TlsCreds)) throw genericError(`Object with id '${id}' is not TLS credentials`);
  if (obj.endpoint !== endpoint) throw genericError(`Expected TLS credentials for a ${endpoint} endpoint`);
  return obj;
}

/** authz-simple: allows exactly one identity (an x509 distinguished name or a PSK username). */
export class AuthzSimple implements UserObject {
  readonly qomType = 'authz-simple';
  constructor(readonly id: string, public identity: string) {}

  getProperty(name: string): unknown {
    return name === 'identity' ? this.identity : undefined;
  }

  setProperty(name: string, value: unknown): boolean {
    if (name !== 'identity') return false;
    expectPropertyType(name, value, 'string');
    this.identity = value;
    return true;
  }

  isAllowed(identity: string): boolean {
    return identity === this.identity;
  }
}

/** QEMU's qauthz_is_allowed_by_id: looked up when a client connects, not when the server starts. */
export function authzAllows(id: string, identity: string, daemon = objectsDaemon()): boolean {
  const obj = daemon ? userObjects(daemon).get(id) : undefined;
  if (!obj) throw genericError(`No authorization object with id '${id}'`);
  if (!(obj instanceof AuthzSimple)) throw genericError(`Object '${id}' is not an instance of authz`);
  return obj.isAllowed(identity);
}
