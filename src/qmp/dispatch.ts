// QMP dispatch (QEMU's qmp_dispatch): checks the request envelope, finds the command, validates
// its arguments against the schema and runs the handler. Only this file builds {"error": …}.
import { QmpError, type QmpErrorClass } from '../qapi/errors.js';
import { hasCommand, validateCommandArgs } from '../qapi/schema.js';
import { qdictKeyOrder } from './json.js';
import type { CommandContext, CommandHandler } from './commands/types.js';
import { log } from '../log.js';

export type QmpResponse =
  | { return: unknown; id?: unknown }
  | { error: { class: QmpErrorClass; desc: string }; id?: unknown };

function errorResponse(err: QmpError, id: unknown): QmpResponse {
  const rsp: Record<string, unknown> = { error: { class: err.errorClass, desc: err.message } };
  if (id !== undefined) rsp.id = id;
  return rsp as QmpResponse;
}

/** Turn anything a handler threw into a QMP error (a bug surfaces as GenericError, not a crash). */
export function toQmpError(err: unknown): QmpError {
  if (err instanceof QmpError) return err;
  log.error({ err }, 'unexpected error in a command handler');
  const e = err as { message?: string };
  return new QmpError('GenericError', e?.message ?? String(err));
}

export interface DispatchOptions {
  /** The command table in force: during negotiation only qmp_capabilities. */
  commands: Record<string, CommandHandler>;
  /** OOB was enabled by qmp_capabilities: 'exec-oob' becomes a valid member. */
  oobEnabled: boolean;
  negotiating: boolean;
}

/** Check the envelope as QEMU does: members in QEMU's (QDict) order, first problem wins. */
function checkEnvelope(request: unknown, oobEnabled: boolean): { command: string; oob: boolean; args: unknown } {
  if (request === null || typeof request !== 'object' || Array.isArray(request)) {
    throw new QmpError('GenericError', 'QMP input must be a JSON object');
  }
  const dict = request as Record<string, unknown>;
  let execKey: string | undefined;
  // QEMU walks the request in its QDict order: with several problems, the first in that order wins.
  for (const name of qdictKeyOrder(Object.keys(dict))) {
    const value = dict[name];
    if (name === 'execute' || (name === 'exec-oob' && oobEnabled)) {
      if (typeof value !== 'string') throw new QmpError('GenericError', `QMP input member '${name}' must be a string`);
      if (execKey) throw new QmpError('GenericError', `QMP input member '${name}' clashes with '${execKey}'`);
      execKey = name;
    } else if (name === 'arguments') {
      if (value === null || typeof value !== 'object' || Array.isArray(value)) {
        throw new QmpError('GenericError', "QMP input member 'arguments' must be an object");
      }
    } else if (name !== 'id') {
      throw new QmpError('GenericError', `QMP input member '${name}' is unexpected`);
    }
  }
  if (!execKey) throw new QmpError('GenericError', "QMP input lacks member 'execute'");
  return { command: dict[execKey] as string, oob: execKey === 'exec-oob', args: dict.arguments ?? {} };
}

export async function dispatch(request: unknown, ctx: CommandContext, opts: DispatchOptions): Promise<QmpResponse> {
  const id =
    request !== null && typeof request === 'object' && !Array.isArray(request)
      ? (request as Record<string, unknown>).id
      : undefined;
  try {
    const { command, oob, args } = checkEnvelope(request, opts.oobEnabled);
    const handler = Object.hasOwn(opts.commands, command) ? opts.commands[command] : undefined;
    if (!handler || !hasCommand(command)) {
      throw new QmpError('CommandNotFound', `The command ${command} has not been found`);
    }
    if (oob) throw new QmpError('GenericError', `The command ${command} does not support OOB`);
    const validated = validateCommandArgs(command, args);
    const ret = await handler(validated, ctx);
    const rsp: Record<string, unknown> = { return: ret ?? {} };
    if (id !== undefined) rsp.id = id;
    return rsp as QmpResponse;
  } catch (err) {
    let qerr = toQmpError(err);
    if (opts.negotiating && qerr.errorClass === 'CommandNotFound') {
      qerr = new QmpError('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
    }
    return errorResponse(qerr, id);
  }
}
