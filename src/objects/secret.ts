// The 'secret' object (QEMU's crypto/secret.c): a named byte string other objects refer to by id.
import { readFileSync } from 'node:fs';
import { createDecipheriv } from 'node:crypto';
import type { Daemon } from '../daemon.js';
import { genericError } from '../qapi/errors.js';
import { strerror } from '../util/errno.js';
import { expectPropertyEnum, expectPropertyType, userObjects, type UserObject } from './user-object.js';

export type SecretFormat = 'raw' | 'base64';

/** SecretProperties as object-add passes them (already schema-checked). */
export interface SecretOptions {
  data?: string;
  file?: string;
  format?: SecretFormat;
  keyid?: string;
  iv?: string;
  loaded?: boolean;
}

const BASE64_CHARS = /^[A-Za-z0-9+/=]*$/;

/** QEMU's qcrypto_base64_decode: strict alphabet, then GLib's lenient decoding. */
function base64Decode(input: string): Buffer {
  if (input.includes('\0')) throw genericError('Base64 data contains embedded NUL characters');
  if (!BASE64_CHARS.test(input)) throw genericError('Base64 data contains invalid characters');
  return Buffer.from(input, 'base64');
}

export class Secret implements UserObject {
  readonly qomType = 'secret';
  /** The loaded (decoded, decrypted) value. */
  value: Buffer = Buffer.alloc(0);

  constructor(readonly id: string, readonly props: SecretOptions) {}

  getProperty(name: string): unknown {
    switch (name) {
      case 'data': case 'file': case 'keyid': case 'iv': return this.props[name] ?? '';
      case 'format': return this.props.format ?? 'raw';
      case 'loaded': return true;
      default: return undefined;
    }
  }

  /** QEMU's setters store the string; the loaded value stays as it was. */
  setProperty(name: string, value: unknown): boolean {
    if (name === 'data' || name === 'file' || name === 'keyid' || name === 'iv') {
      expectPropertyType(name, value, 'string');
      this.props[name] = value;
      return true;
    }
    if (name === 'format') {
      expectPropertyEnum(name, value, ['raw', 'base64']);
      this.props.format = value;
      return true;
    }
    return false;
  }
}

function readSecretFile(file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (err) {
    const what = (err as NodeJS.ErrnoException).syscall === 'read' ? 'Error reading' : 'Failed to open';
    throw genericError(`Unable to read ${file}: ${what} file \u201C${file}\u201D: ${strerror(err)}`);
  }
}

/** QEMU's qcrypto_secret_decrypt: AES-256-CBC keyed by another secret, PKCS#7-style padding. */
function decrypt(daemon: Daemon, props: SecretOptions, input: Buffer): Buffer {
  const key = secretValue(daemon, props.keyid!);
  if (key.length !== 32) throw genericError('Key should be 32 bytes in length');
  if (props.iv === undefined) throw genericError('IV is required to decrypt secret');
  const iv = base64Decode(props.iv);
  if (iv.length !== 16) throw genericError(`IV should be 16 bytes in length not ${iv.length}`);
  const ciphertext = props.format === 'base64' ? base64Decode(input.toString('latin1')) : input;
  if (ciphertext.length % 16 !== 0) {
    throw genericError(`Length ${ciphertext.length} must be a multiple of block size 16`);
  }
  const decipher = createDecipheriv('aes-256-cbc', key, iv);
  decipher.setAutoPadding(false);
  const plain = Buffer.concat([decipher.update(ciphertext), decipher.final()]);
  if (plain.length === 0) return plain;
  const pad = plain[plain.length - 1];
  if (pad > plain.length) throw genericError(`Incorrect number of padding bytes (${pad}) found on decrypted data`);
  return plain.subarray(0, plain.length - pad);
}

/** object-add's property-setting step, before the object joins /objects: QEMU refuses 'loaded'. */
export function checkSecretProperties(props: SecretOptions): void {
  if (props.loaded !== undefined) throw genericError("Property 'secret.loaded' is not writable");
}

/** object-add's completion step (user_creatable_complete): load the value. */
export function createSecret(daemon: Daemon, id: string, props: SecretOptions): Secret {
  const { data, file } = props;
  if (data !== undefined && file !== undefined) throw genericError("'file' and 'data' are mutually exclusive");
  if (data === undefined && file === undefined) throw genericError("Either 'file' or 'data' must be provided");
  const input = file !== undefined ? readSecretFile(file) : Buffer.from(data!, 'utf8');
  const secret = new Secret(id, { ...props });
  if (props.keyid !== undefined) secret.value = decrypt(daemon, props, input);
  else if (props.format === 'base64') secret.value = base64Decode(input.toString('latin1'));
  else secret.value = input;
  return secret;
}

/** QEMU's qcrypto_secret_lookup: the loaded bytes of secret `id`. */
export function secretValue(daemon: Daemon, id: string): Buffer {
  const obj = userObjects(daemon).get(id);
  if (!obj) {
    if (daemon.objects.has(id)) throw genericError(`Object with id '${id}' is not a secret`);
    throw genericError(`No secret with id '${id}'`);
  }
  if (!(obj instanceof Secret)) throw genericError(`Object with id '${id}' is not a secret`);
  return Buffer.from(obj.value);
}

/** QEMU's qcrypto_secret_lookup_as_utf8: the secret as a string, refused if not UTF-8. */
export function secretString(daemon: Daemon, id: string): string {
  const value = secretValue(daemon, id);
  const text = value.toString('utf8');
  if (!Buffer.from(text, 'utf8').equals(value)) throw genericError(`Data from secret ${id} is not valid UTF-8`);
  return text;
}
