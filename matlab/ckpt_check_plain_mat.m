function [ok, reason] = ckpt_check_plain_mat(path)
%CKPT_CHECK_PLAIN_MAT  Whether a MAT file holds data only, judged from its bytes, before load.
%   [ok, reason] = ckpt_check_plain_mat('checkpoints/step_00000400.mat')
%   load can run code: Octave rebuilds a function handle by evaluating the text stored for
%   it, MATLAB calls the loadobj method of an object's class. The marker's sha256 does not
%   stop someone who can write the checkpoint folder: they rewrite the marker too. So the
%   kit reads the file's elements as the MAT format (version 5, what ckpt_save writes with
%   -v6) defines them and accepts numbers, logicals, characters, sparse matrices, cells
%   and structs only. An object, a function handle, compressed data (-v7) or any other
%   format gives ok = false, and reason says what was found.
  [~, base, ext] = fileparts(path);
  name = [base ext];
  ok = false;
  fid = fopen(path, 'r');
  if fid < 0
    reason = sprintf('%s: cannot be opened', name);
    return;
  end
  bytes = double(fread(fid, Inf, 'uint8=>uint8')');
  fclose(fid);
  if numel(bytes) < 128 || ~strncmp(char(bytes(1:6)), 'MATLAB', 6) ...
      || ~strcmp(char(bytes(127:128)), 'IM')
    found = 'it is not the little-endian MAT file ckpt_save writes';
  else
    found = unsafe_element(bytes, 129, numel(bytes));
  end
  ok = isempty(found);
  reason = '';
  if ~ok
    reason = sprintf(['%s: unsafe, refused to load: %s; a checkpoint holds data only, ' ...
                      'and load can run code'], name, found);
  end
end

function found = unsafe_element(bytes, first, last)
  % What is not plain data among the elements in bytes(first:last), or ''.
  found = '';
  pos = first;
  while pos <= last
    if pos + 7 > last
      found = 'an element is cut short';
      return;
    end
    type = uint32_at(bytes, pos);
    if type >= 65536  % a small element: type and size in 4 bytes, at most 4 bytes of data
      pos = pos + 8;
      continue;
    end
    data = pos + 8;
    stop = data + uint32_at(bytes, pos + 4) - 1;
    if stop > last
      found = 'an element is cut short';
    elseif type == 15
      found = 'it is compressed (-v7), so its content cannot be checked; ckpt_save writes -v6';
    elseif type == 14 && stop >= data  % an array: its class, then its parts
      found = unsafe_array(bytes, data, stop);
    end
    if ~isempty(found)
      return;
    end
    pos = data + ceil((stop - data + 1) / 8) * 8;  % elements start on 8-byte boundaries
  end
end

function found = unsafe_array(bytes, first, last)
  % An array's first part is its flags (a uint32 pair), the class in the low byte: cells
  % (1), structs (2), chars (4), sparse (5) and numbers and logicals (6-15) are data.
  class_id = bytes(first + 8);
  switch class_id
    case 3
      found = 'it holds an object';
    case 16
      found = 'it holds a function handle';
    case 17
      found = 'it holds an object (a classdef instance)';
    otherwise
      if class_id < 1 || class_id > 15
        found = sprintf('it holds an array of MAT class %d', class_id);
      else
        found = unsafe_element(bytes, first, last);  % cells and structs hold arrays
      end
  end
end

function value = uint32_at(bytes, pos)
  value = bytes(pos) + 256 * bytes(pos + 1) + 65536 * bytes(pos + 2) + 16777216 * bytes(pos + 3);
end

%!test
%! % every kind of data ckpt_save may be given passes
%! file = [tempname() '.mat'];
%! checkpoint = struct ('step', 7, 'data', {{'a', [1 2 3]}}, 'sparse', sparse ([1 0; 0 2]), ...
%!                      'flag', true, 'small', int8 ([1 2]), 'z', 1 + 2i, 'empty', [], ...
%!                      'cells', {{}}, 'nested', struct ('q', {1, 2}), 'rng', rand ('state'));
%! save (file, 'checkpoint', '-v6');
%! [ok, reason] = ckpt_check_plain_mat (file);
%! assert (ok); assert (reason, '');
%! delete (file);

%!test
%! % Octave's text format (load reads it whatever the name says) and -v7 are refused
%! file = [tempname() '.mat'];
%! checkpoint = struct ('step', 7);
%! save (file, 'checkpoint', '-text');
%! [ok, reason] = ckpt_check_plain_mat (file);
%! assert (! ok); assert (index (reason, 'not the little-endian MAT file') > 0);
%! save (file, 'checkpoint', '-v7');
%! [ok, reason] = ckpt_check_plain_mat (file);
%! assert (! ok); assert (index (reason, 'compressed (-v7)') > 0);
%! delete (file);

%!test
%! % an array whose class byte says function handle or object, deep in a struct, is refused
%! file = [tempname() '.mat'];
%! checkpoint = struct ('step', 7, 'inner', struct ('x', 3));
%! save (file, 'checkpoint', '-v6');
%! fid = fopen (file); bytes = fread (fid, Inf, 'uint8=>uint8'); fclose (fid);
%! flags = find (bytes(1:end-8) == 6 & bytes(5:end-4) == 8 & bytes(9:end) == 6);
%! double_class = flags + 8;  % the array flags' tag (miUINT32, 8 bytes), then the class
%! for class_id = [16 3 17]
%!   edited = bytes; edited(double_class(end)) = class_id;
%!   fid = fopen (file, 'w'); fwrite (fid, edited); fclose (fid);
%!   [ok, reason] = ckpt_check_plain_mat (file);
%!   assert (! ok);
%!   assert (index (reason, {'', '', 'an object', '', '', '', '', '', '', '', '', '', '', ...
%!                           '', '', 'a function handle', 'classdef'}{class_id}) > 0);
%! end
%! delete (file);
