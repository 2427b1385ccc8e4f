// TLS over an NBD socket after NBD_OPT_STARTTLS (QEMU's qio_channel_tls): node:tls sessions with QEMU's checks and messages.
import * as tls from 'node:tls';
import { isIP, type Socket } from 'node:net';
import { X509Certificate } from 'node:crypto';
import { authzAllows, type TlsCreds } from '../objects/tls-creds.js';

/** One secure context per credentials object: the files were read at object-add. */
const contexts = new WeakMap<TlsCreds, tls.SecureContext>();

function secureContext(creds: TlsCreds): tls.SecureContext {
  let ctx = contexts.get(creds);
  if (!ctx) {
    ctx = creds.qomType === 'tls-creds-psk'
      ? tls.createSecureContext({ ciphers: 'PSK', maxVersion: 'TLSv1.2' })
      : tls.createSecureContext({ ca: creds.ca, crl: creds.crl, cert: creds.cert, key: creds.key, passphrase: creds.passphrase });
    contexts.set(creds, ctx);
  }
  return ctx;
}

/** gnutls' verification status words for the OpenSSL codes Node reports (QEMU prints gnutls'). */
function verifyMessage(code: string | Error | null | undefined): string {
  switch (String((code as { code?: string } | null)?.code ?? code)) {
    case 'CERT_HAS_EXPIRED': return 'The certificate has expired';
    case 'CERT_NOT_YET_VALID': return 'The certificate is not yet activated';
    case 'CERT_REVOKED': return 'The certificate has been revoked';
    case 'UNABLE_TO_GET_ISSUER_CERT':
    case 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY':
    case 'UNABLE_TO_VERIFY_LEAF_SIGNATURE': return "The certificate hasn't got a known issuer";
    default: return 'The certificate is not trusted';
  }
}

const caLists = new WeakMap<TlsCreds, X509Certificate[]>();

/** The certificates of ca-cert.pem (a list is allowed). */
function caCerts(creds: TlsCreds): X509Certificate[] {
  let list = caLists.get(creds);
  if (!list) {
    const blocks = creds.ca?.toString('latin1').match(/-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----/g) ?? [];
    list = blocks.map((pem) => new X509Certificate(pem));
    caLists.set(creds, list);
  }
  return list;
}

/**
 * A standalone server TLSSocket leaves `authorized` unset (only tls.Server computes it), so the
 * client's certificate is checked here: issued and signed by a CA of ca-cert.pem, and in date.
 */
function checkClientCert(creds: TlsCreds, leaf: X509Certificate): void {
  const issuer = caCerts(creds).find((ca) => leaf.checkIssued(ca) && leaf.verify(ca.publicKey));
  if (!issuer) throw new Error("The certificate hasn't got a known issuer");
  const now = Date.now();
  for (const c of [leaf, issuer]) {
    if (Date.parse(c.validTo) < now) throw new Error('The certificate has expired');
    if (Date.parse(c.validFrom) > now) throw new Error('The certificate is not yet activated');
  }
}

/** The peer's DN as QEMU (gnutls_x509_crt_get_dn) shows it to authz: RDNs in certificate order, comma-separated. */
function peerName(t: tls.TLSSocket): string | undefined {
  return t.getPeerX509Certificate()?.subject.split('\n').join(',');
}

/** QEMU's handshake failure text; the reason is OpenSSL's, not gnutls'. */
function handshakeError(err: Error): Error {
  const reason = (err as { reason?: string }).reason ?? err.message;
  return new Error(`TLS handshake failed: ${reason}`);
}

/** Resolves once the handshake is done and `check` passed; the socket is destroyed on failure. */
function settle(t: tls.TLSSocket, event: 'secure' | 'secureConnect', check: () => void): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error) => {
      cleanup();
      reject(handshakeError(err));
    };
    const onClose = () => {
      cleanup();
      reject(new Error('TLS handshake failed: The TLS connection was non-properly terminated.'));
    };
    const onSecure = () => {
      cleanup();
      try {
        check();
      } catch (err) {
        t.destroy();
        reject(err as Error);
        return;
      }
      resolve(t);
    };
    const cleanup = () => {
      t.off('error', onError);
      t.off('close', onClose);
      t.off(event, onSecure);
    };
    t.once('error', onError);
    t.once('close', onClose);
    t.once(event, onSecure);
  });
}

/** The server side of STARTTLS: `socket` is the TLS socket at once; `ready` settles after the checks. */
export function tlsServerSession(raw: Socket, creds: TlsCreds, authzId?: string): { socket: tls.TLSSocket; ready: Promise<tls.TLSSocket> } {
  const psk = creds.qomType === 'tls-creds-psk';
  let pskIdentity: string | undefined;
  const t = new tls.TLSSocket(raw, {
    isServer: true,
    secureContext: secureContext(creds),
    requestCert: !psk && creds.verifyPeer,
    rejectUnauthorized: false,
    ...(psk ? {
      pskCallback: (_s: tls.TLSSocket, identity: string) => {
        pskIdentity = identity;
        return creds.pskKeys?.get(identity) ?? null;
      },
    } : {}),
  });
  const ready = settle(t, 'secure', () => {
    if (!creds.verifyPeer) return;
    let name: string | undefined;
    if (psk) {
      name = pskIdentity;
    } else {
      const leaf = t.getPeerX509Certificate();
      if (leaf === undefined) throw new Error('Verify failed: No certificate was found.');
      checkClientCert(creds, leaf);
      name = peerName(t);
    }
    if (authzId !== undefined && name !== undefined && !authzAllows(authzId, name)) {
      throw new Error(`TLS ${psk ? 'PSK' : 'x509'} authz check for ${name} is denied`);
    }
  });
  return { socket: t, ready };
}

/** The client side of STARTTLS (QEMU's nbd_receive_starttls): resolves with the checked TLS socket. */
export function tlsClientSession(raw: Socket, creds: TlsCreds, hostname: string | undefined): Promise<tls.TLSSocket> {
  const psk = creds.qomType === 'tls-creds-psk';
  const username = creds.props.username ?? 'qemu';
  const t = tls.connect({
    socket: raw,
    secureContext: secureContext(creds),
    rejectUnauthorized: false,
    // QEMU's gnutls session sends no SNI; a name only where one is allowed.
    ...(hostname !== undefined && isIP(hostname) === 0 ? { servername: hostname } : {}),
    checkServerIdentity: () => undefined,
    ...(psk ? { pskCallback: () => ({ identity: username, psk: creds.pskKeys!.get(username)! }) } : {}),
  });
  return settle(t, 'secureConnect', () => {
    if (psk || !creds.verifyPeer) return;
    const cert = t.getPeerCertificate();
    if (!cert || Object.keys(cert).length === 0) throw new Error('Verify failed: No certificate was found.');
    if (!t.authorized) throw new Error(verifyMessage(t.authorizationError));
    if (hostname === undefined) throw new Error('No hostname for certificate validation');
    if (tls.checkServerIdentity(hostname, cert) !== undefined) throw new Error(`Certificate does not match the hostname ${hostname}`);
  });
}
