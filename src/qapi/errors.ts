// QMP error type: handlers throw it, only the dispatcher turns it into {"error": {...}}.

/** QEMU's QapiErrorClass values. Almost everything is GenericError. */
export type QmpErrorClass =
  | 'GenericError'
  | 'CommandNotFound'
  | 'DeviceNotActive'
  | 'DeviceNotFound'
  | 'KVMMissingCap';

export class QmpError extends Error {
  constructor(
    readonly errorClass: QmpErrorClass,
    message: string,
    /** QEMU's error_append_hint() text; shown on the command line, not over QMP. */
    readonly hint?: string,
  ) {
    super(message);
    this.name = 'QmpError';
  }
}

/** Shorthand for the common case. */
export function genericError(message: string, hint?: string): QmpError {
  return new QmpError('GenericError', message, hint);
}

/** An Error from a system call, as native calls and node:fs raise them. */
export interface ErrnoError extends Error {
  errno?: number;
  code?: string;
  syscall?: string;
}
